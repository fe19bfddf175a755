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
