"""The soak's server: `marserve serve` in a child process (with the test-only faults armed), its RSS and /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `marserve serve` (default model, fp32, API key on) on 127.0.0.1; restartable on the same port."""

    def __init__(self, api_key: str, log_path: Path, expert_cache: str | None = None, port: int | None = None,
                 shutdown_grace: float = 10.0):
        self.api_key, self.log_path = api_key, log_path
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--dtype", "float32", "--api-key", api_key,
                     "--shutdown-grace", str(shutdown_grace), "--log-level", "warning", "--quiet"]
        if expert_cache is not None:  # the offloaded expert cache (e.g. 0.25; faulty_serve.py then corrupts reads)
            self.args += ["--expert-cache", expert_cache]
        self.proc: subprocess.Popen | None = None
        self.rss_samples: list[tuple[float, float]] = []  # (time.monotonic(), MB)
        self._sampling = False

    @property
    def command(self) -> str:
        return " ".join([sys.executable, "-m", "tests.soak.faulty_serve", *self.args])

    def start(self, timeout: float = 600) -> float:
        """Starts the server and waits for /health; returns the seconds it took."""
        t0 = time.monotonic()
        log = open(self.log_path, "ab")
        log.write(f"\n==== {time.strftime('%H:%M:%S')} {self.command}\n".encode())
        log.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.soak.faulty_serve", *self.args], cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting; see {self.log_path}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {timeout} s; see {self.log_path}")

    def rss_mb(self) -> float | None:
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            return None
        return None

    def sample_rss(self, every_seconds: float = 2.0) -> None:
        """Records RSS in a background thread until stop_sampling()."""
        self._sampling = True

        def loop():
            while self._sampling:
                rss = self.rss_mb()
                if rss is not None:
                    self.rss_samples.append((time.monotonic(), rss))
                time.sleep(every_seconds)

        threading.Thread(target=loop, daemon=True).start()

    def stop_sampling(self) -> None:
        self._sampling = False

    def metrics(self) -> dict[str, float]:
        """The /metrics samples this soak reads, keyed by name (and outcome label where there is one)."""
        out: dict[str, float] = {}
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = s.name + (f"{{{s.labels['outcome']}}}" if "outcome" in s.labels else "")
                if "layer" in s.labels:  # per-layer expert-cache counters: summed over layers
                    out[key] = out.get(key, 0.0) + s.value
                else:
                    out[key] = s.value
        return out

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 60 s); the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.signal(signal.SIGTERM)
        code = self.wait(60)
        if code is None:
            self.proc.kill()
            code = self.proc.wait()
        return code
