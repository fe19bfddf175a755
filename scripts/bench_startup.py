"""A new user's first minutes, timed: `marserve --help`, `--version`, a busy port, and `bash scripts/serve.sh`
until the server listens (the README's serve command, set up already). Prints each figure and the command.

    .venv/bin/python scripts/bench_startup.py [--repeats 3]

Targets (issue 19): --help under 1 s, a busy port failing in under 5 s with one line, the second serve.sh
start listening in under 15 s on a 2-core machine. Run it after `bash scripts/setup.sh`.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARSERVE = str(ROOT / ".venv" / "bin" / "marserve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    return time.perf_counter() - t0, done


def _serve_until_listening(timeout: float = 120.0) -> float:
    """Seconds from `bash scripts/serve.sh` to its "listening" line; the server is stopped afterwards."""
    port = _free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "scripts/serve.sh", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "listening on" in line:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                break
        raise SystemExit(f"serve.sh did not listen within {timeout:.0f} s (exit {proc.poll()})")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from marserve_kernels import cpu_features  # no torch import before the timings would matter: they run apart
    print(f"host: {cpu_features.describe()}, {os.cpu_count()} cores, Python {platform.python_version()}")

    for flag in ("--help", "--version"):
        best = min(_timed([MARSERVE, flag])[0] for _ in range(args.repeats))
        print(f"marserve {flag}: {best:.2f} s (best of {args.repeats}; target < 1 s)")

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        seconds, done = _timed(["bash", "scripts/serve.sh", "--port", str(port)])
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    print(f"serve.sh on a busy port: exit {done.returncode} after {seconds:.2f} s, {len(lines)} line(s) on stderr"
          f" (target < 5 s, one line): {lines[-1] if lines else ''}")

    times = [_serve_until_listening() for _ in range(args.repeats)]
    print("serve.sh until listening: " + ", ".join(f"{t:.1f} s" for t in times)
          + " (the first may build kernels; target: later starts < 15 s)")
    print("command: .venv/bin/python scripts/bench_startup.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
