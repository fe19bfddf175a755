import os
import re
import subprocess
import sys

import torch

from marserve_kernels import cpu_features, native_build


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "marserve.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("generate", "inspect", "serve", "train", "bench", "doctor"):
        assert name in out.stdout


def _doctor(**env) -> dict[str, str]:
    """Runs `marserve doctor`; its lines as label -> value (labels are the aligned first column)."""
    out = subprocess.run([sys.executable, "-m", "marserve.cli", "doctor"], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    # "label<spaces>value" with the values aligned; labels hold single spaces at most ("onednn bf16")
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.stdout.splitlines())


def test_doctor_names_the_isa_and_lists_every_kernel_variant():
    report = _doctor()
    assert report["isa"].startswith(cpu_features.isa()) and cpu_features.host_isa() in report["isa"]
    assert report["cpu"] == cpu_features.cpu_name()
    for name, kernel in native_build.kernels().items():
        for key in kernel.variants:
            state = report[f"{kernel.source.stem} {str(key).replace('torch.', '')}"]
            reason = kernel.reason(key)  # what this process makes of the same kernel
            assert state == (f"unavailable: {reason}" if reason else f"built {kernel.lib(key)._name}")
    assert "default model" in report["dtype auto"]
    assert report["torch"].startswith(torch.__version__)
    assert {"triton", "transformers", "onednn bf16", "kernel cache"} <= report.keys()


def test_doctor_reports_a_switched_off_or_misconfigured_host_and_still_exits_0():
    report = _doctor(MARSERVE_NATIVE="0", MARSERVE_NATIVE_ISA="sse9")
    assert report["isa"].startswith("error: MARSERVE_NATIVE_ISA='sse9'")
    assert report["native kernels"].startswith("0 of ")
    kernels = [value for label, value in report.items() if label.startswith("cpu_")]
    assert len(kernels) == sum(len(k.variants) for k in native_build.kernels().values())
    assert all(value == "unavailable: native kernels switched off (MARSERVE_NATIVE=0)" for value in kernels)


def test_cli_help_lists_every_benchmark():
    from marserve.commands.bench import BENCHMARKS
    out = subprocess.run([sys.executable, "-m", "marserve.cli", "--help"], capture_output=True, text=True)
    bench_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("bench"))
    for name in BENCHMARKS:
        assert name in bench_line


# Builds the whole parser, renders every command's and benchmark's help and makes a usage error, then
# lists the heavy modules that got imported: the CLI must answer these without loading torch (~4 s).
_NO_HEAVY_IMPORTS = """
import contextlib, io, sys
from marserve import cli
parser = cli.build_parser()
for argv in (["--help"], ["--version"], ["serve", "--port", "nope"], ["generate", "--help"], ["serve", "--help"],
             ["inspect", "--help"], ["train", "--help"], ["bench", "--help"], ["bench", "moe", "--help"],
             ["bench", "throughput", "--help"], ["bench", "linear", "--help"], ["bench", "linear", "--bogus"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:
            pass
print(" ".join(m for m in ("torch", "transformers", "fastapi", "uvicorn", "marserve_server") if m in sys.modules))
"""


def test_parser_and_help_import_no_torch():
    out = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"building the CLI parser imported {out.stdout.strip()}"


def test_usage_error_exits_2_with_one_line_reason():
    out = subprocess.run([sys.executable, "-m", "marserve.cli", "serve", "--port", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid int value: 'nope'" in out.stderr


# `marserve serve` on a port another socket listens on; prints what stderr said, the exit code and
# whether torch was imported (it must not be: the port is claimed before the engine is even imported).
_SERVE_ON_BUSY_PORT = """
import socket, sys
from marserve import cli
held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
port = held.getsockname()[1]
rc = cli.main(["serve", "--port", str(port)])
print(port, rc, "torch" in sys.modules)
"""


def test_serve_on_a_busy_port_fails_in_one_line_before_loading_anything():
    out = subprocess.run([sys.executable, "-c", _SERVE_ON_BUSY_PORT], capture_output=True, text=True)
    port, rc, torch_imported = out.stdout.split()
    assert rc != "0"
    assert torch_imported == "False"
    assert out.stderr.count("\n") == 1 and f"port {port} is in use" in out.stderr, out.stderr
