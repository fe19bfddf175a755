"""What this CPU can run: the instruction set the native kernels are built for, and whether oneDNN's bf16
paths work here. Every capability decision of marserve's CPU path asks this module, so one switch can make
them all as on a lesser host.

ISAs, best first:
- avx512: AVX-512 F/BW/DQ/VL (Intel Xeon since Skylake-SP, AMD Zen 4): 16-lane fp32 vectors, 32 registers.
- avx2: AVX2 + FMA (x86-64-v3: Intel since Haswell, AMD since Zen 1): 8 lanes, 16 registers.
- generic: portable C (GCC vector extensions at the compiler's baseline: SSE2 on x86-64, NEON on aarch64).

MARSERVE_NATIVE_ISA=avx512|avx2|generic treats the host as having that ISA at most: the kernels are built
for it, and oneDNN's bf16 packing and inner products count as unsupported below avx512 (torch checks the
CPU's flags itself, so ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY alone would not stop them). Asking for more
than the host has is an error: such code would die of an illegal instruction.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

ISAS = ("generic", "avx2", "avx512")  # worst to best
_ENV = "MARSERVE_NATIVE_ISA"
_AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
_AVX2 = {"avx2", "fma"}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (or of the text given); empty where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / aarch64
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_of(flags: frozenset[str], machine: str | None = None) -> str:
    """The best ISA these flags allow on this kind of machine."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return "generic"
    if _AVX512 <= flags:
        return "avx512"
    return "avx2" if _AVX2 <= flags else "generic"


@functools.cache
def host_isa() -> str:
    """What this host's CPU supports."""
    return isa_of(cpu_flags())


def forced_isa() -> str | None:
    """MARSERVE_NATIVE_ISA, validated; None when unset."""
    value = os.environ.get(_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ISAS:
        raise ValueError(f"{_ENV}={value!r}: expected one of {', '.join(ISAS)}")
    return value


def isa() -> str:
    """The ISA marserve acts on: the host's, or the lesser one MARSERVE_NATIVE_ISA asks for."""
    host, forced = host_isa(), forced_isa()
    if forced is None:
        return host
    if ISAS.index(forced) > ISAS.index(host):
        raise ValueError(f"{_ENV}={forced}: this CPU supports {host} at most (its code would not run here)")
    return forced


def is_capped() -> bool:
    """True when MARSERVE_NATIVE_ISA makes marserve act below the host's ISA."""
    return isa() != host_isa()


def onednn_bf16() -> bool:
    """Whether oneDNN's bf16 inner products and weight packing run here: torch's own check, and never
    below avx512 (the cap: the same answer an AVX2 host gives)."""
    if isa() != "avx512" and is_capped():
        return False
    return (torch.backends.mkldnn.is_available()
            and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def describe() -> str:
    """One line for logs and benchmark headers: the ISA acted on, the host's, the CPU's name."""
    act = isa()
    host = host_isa()
    return f"{act}" + ("" if act == host else f" (capped; host {host})") + f", {cpu_name()}"
