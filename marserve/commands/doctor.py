"""`marserve doctor`: what marserve makes of this machine: the CPU's ISA, which native kernels are built (or
why not), which dtype `auto` picks for the default model and why, and the versions that matter."""

from __future__ import annotations

import argparse
import importlib.metadata


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass  # nothing to choose: it reports (torch is imported in run, so --help stays fast)


def _version(package: str) -> str:
    try:  # the installed metadata: importing triton or transformers would take seconds
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _isa_line() -> str:
    from marserve_kernels import cpu_features
    host = cpu_features.host_isa()
    try:
        act = cpu_features.isa()
    except ValueError as e:  # MARSERVE_NATIVE_ISA asks for more than the host has, or for no ISA at all
        return f"error: {e} (host {host})"
    if act == host:
        return f"{act} (the host's)"
    return f"{act} (capped by MARSERVE_NATIVE_ISA; host {host})"


def _onednn_line() -> str:
    from marserve_kernels import cpu_features
    try:
        if cpu_features.onednn_bf16():
            return "yes"
        if cpu_features.is_capped():
            return f"no (MARSERVE_NATIVE_ISA caps this {cpu_features.host_isa()} host below avx512)"
    except ValueError as e:
        return f"error: {e}"
    return "no (torch's check: this CPU lacks oneDNN's bf16 instructions); bf16 weights stay plain"


def kernel_lines() -> list[tuple[str, str, str]]:
    """(source, variant, 'built <path>' or the reason it is not), for every native kernel and variant;
    builds what the cache lacks."""
    from marserve_kernels import native_build
    rows = []
    for kernel in native_build.kernels().values():
        for key in kernel.variants:
            lib = kernel.lib(key)
            state = f"built {lib._name}" if lib is not None else f"unavailable: {kernel.reason(key)}"
            rows.append((kernel.source.stem, str(key).replace("torch.", ""), state))
    return rows


def _auto_dtype_line() -> str:
    from marserve import DEFAULT_MODEL_DIR
    from marserve.config import ModelConfig
    from marserve.errors import MarserveError
    from marserve.loader import auto_dtype
    try:
        stored = ModelConfig.from_dir(DEFAULT_MODEL_DIR).dtype
        dtype, why = auto_dtype(stored)
    except (MarserveError, ValueError) as e:
        return f"unknown: {e}"
    return f"{str(dtype).replace('torch.', '')} for the default model (stored as {stored}): {why}"


def run(args: argparse.Namespace) -> int:
    import logging

    import torch

    from marserve import __version__
    from marserve_kernels import cpu_features, native_build

    # A kernel that does not build logs a warning; its reason is in the table below, once is enough.
    logging.getLogger(native_build.__name__).setLevel(logging.ERROR)
    kernels = kernel_lines()
    rows = [
        ("marserve", __version__),
        ("cpu", cpu_features.cpu_name()),
        ("isa", _isa_line()),
        ("onednn bf16", _onednn_line()),
        ("kernel cache", str(native_build.cache_dir())),
        ("native kernels", f"{sum(state.startswith('built') for *_, state in kernels)} of {len(kernels)} built"),
        *((f"  {source} {variant}", state) for source, variant, state in kernels),
        ("dtype auto", _auto_dtype_line()),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads"),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0
