"""RMSNorm with the residual add fused in, for fp32 tokens on CPU (cpu_rms_norm.c, built at first use).

torch's rms_norm on CPU runs as ~8 small ops: measured here with hidden 512, add + norm took 9.5 us at one
token, 11 us at 16 and 150 us at 256 tokens; the kernel 0.9, 2.0 and 22 us. A decoder layer has two norms
and two residual adds, so at batch-1 decode torch's cost ~0.3 ms per token on the bench model. Reference: `add_rms_norm_reference`. MARSERVE_NATIVE_NORM=0 (or MARSERVE_NATIVE=0)
turns it off. Legend: T=tokens, H=hidden.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from marserve_kernels import native_build

_SOURCE = Path(__file__).with_name("cpu_rms_norm.c")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.add_rms_norm.argtypes = [p, p, p, ctypes.c_float, p, i64, i64, i64]
    lib.add_rms_norm.restype = None


_KERNEL = native_build.Kernel(_SOURCE, {torch.float32: []}, "MARSERVE_NATIVE_NORM", _declare)
_lib: list[ctypes.CDLL | None] = []  # [the fp32 build or None] once asked: applies() runs twice a layer


def available() -> bool:
    if not _lib:
        _lib.append(_KERNEL.lib(torch.float32))
    return _lib[0] is not None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for `dtype` is not built here, in one line (building it on first call), or None when it is."""
    return _KERNEL.reason(dtype)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32, CPU, contiguous rows, a 1-D weight, no autograd: what the kernel takes. (Runs twice per layer
    per pass: cheapest checks first.)"""
    f32 = torch.float32
    return (x.dtype is f32 and weight.dtype is f32 and x.is_cpu and x.dim() == 2 and weight.dim() == 1
            and (_lib[0] is not None if _lib else available()) and x.is_contiguous() and weight.is_contiguous()
            and not ((x.requires_grad or weight.requires_grad) and torch.is_grad_enabled()))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x [T, H]; residual [T, H] or None (then x is normalised); weight [H] -> out [T, H].
    With a residual: residual += x in place, and out is the norm of that sum."""
    if not (applies(x, weight) and (residual is None or (residual.shape == x.shape and residual.is_contiguous()
                                                          and residual.dtype is torch.float32))):
        raise ValueError("add_rms_norm takes contiguous fp32 CPU rows (check applies() first)")
    out = torch.empty_like(x)
    _lib[0].add_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                         eps, out.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    return out


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); residual None means x alone."""
    total = x if residual is None else x + residual
    return F.rms_norm(total, (x.shape[-1],), weight, eps), total
