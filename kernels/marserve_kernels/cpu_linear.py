"""y = x @ W^T on CPU: the native few-token kernel on plain weights, oneDNN for the rest.

Measured on this project's AMD EPYC machines (2 cores, fp32; `marserve bench linear`): MKL's sgemm/sgemv
reach ~210 GFLOP/s and ~16 GB/s for one token, oneDNN ~470 GFLOP/s and ~37 GB/s on the same plain
[N, K] weights. `pack` re-lays a weight out in oneDNN's blocked format (same size, replacing the plain
one), which keeps a few-token product streaming faster (1.4x plain oneDNN at 2-16 tokens) but still
at 50-75% of the memory bandwidth. The native kernel (cpu_dense_native, cpu_dense_small.c) streams a
plain weight once per call and reaches ~90% of it at 1-8 tokens.

NATIVE_MAX_TOKENS = 64, from interleaved runs over 144 weights shaped like 24 layers of the bench model
(2026-12-02; native / oneDNN on the same plain weights / oneDNN packed, GFLOP/s, 2 threads):
  weights in cache (12 MiB): T=16 324 / 249 / 328, T=32 343 / 316 / 371, T=64 394 / 379 / 423,
                             T=96 379 / 405 / 441, T=128 387 / 409 / 439;
  weights from memory (288 MiB): T=16 211 / 131 / 212, T=32 267 / 198 / 289, T=64 316 / 306 / 366.
Up to 64 tokens the native kernel beats oneDNN on the plain weights the engine now keeps; from ~96 oneDNN
is faster. Packed oneDNN stays ahead by 5-15% at 32-64 tokens and 5-11% at 256-2048 (prefill), but needs the
weight in its own layout: the engine keeps one copy, plain, when the native kernel is available
(models.base.MoeForCausalLM.pack_for_cpu), because decode (1-16 tokens) gains more (docs/benchmarks.md).
F.linear stays the path for autograd, other devices and builds without oneDNN.

oneDNN runs bf16 only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT (`cpu_features.onednn_bf16`); elsewhere
(AVX2 hosts, or MARSERVE_NATIVE_ISA below avx512) bf16 weights stay plain and the native kernel takes them at
every token count: torch's own bf16 matmul there runs at ~12-18 GFLOP/s, the native kernel's outer-product
form at ~70-120 (AMD EPYC, AVX2, 2 threads, 1024 x 1024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from marserve_kernels import cpu_dense_native, cpu_features

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
NATIVE_MAX_TOKENS = 64  # rows of x up to which plain weights go to the native kernel (measured: see above)
_native: dict[torch.dtype, bool] = {}  # weight dtype -> cpu_dense_native.available(dtype), asked once
_onednn: dict[torch.dtype, bool] = {}  # dtype -> whether oneDNN runs it, asked once (~5 us a call for bf16)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn_available()


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product (and its weight packing) runs `dtype` on this CPU (asked once per process,
    like native_available: the cap is a process's setting)."""
    ok = _onednn.get(dtype)
    if ok is None:
        ok = _onednn[dtype] = ONEDNN and (dtype == torch.float32
                                          or (dtype == torch.bfloat16 and cpu_features.onednn_bf16()))
    return ok


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dim() == 2 and onednn_runs(weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] plain weight -> the same weight in oneDNN's blocked layout (an opaque mkldnn tensor that
    only `linear` reads; shape and dtype stay). Callers replace the plain weight with it."""
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.dtype} weight on {weight.device} with this torch build")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)


def native_available(dtype: torch.dtype) -> bool:
    """Whether plain weights of `dtype` can take the native few-token kernel (built on first ask)."""
    ok = _native.get(dtype)
    if ok is None:
        ok = _native[dtype] = dtype in _NATIVE_DTYPES and cpu_dense_native.available(dtype)
    return ok


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K] (plain or packed), bias [N] | None -> [..., N]; same result as F.linear."""
    if (not weight.is_mkldnn and native_available(weight.dtype)
            and weight.dtype == x.dtype and x.device.type == "cpu" and weight.dim() == 2
            and ((x.shape[0] if x.dim() == 2 else x.numel() // max(1, x.shape[-1])) <= NATIVE_MAX_TOKENS
                 or not onednn_runs(weight.dtype))  # bf16 without oneDNN: the native kernel at every size
            and x.shape[-1] == weight.shape[1] and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                   or (bias is not None and bias.requires_grad)))):
        return cpu_dense_native.small_linear(x, weight, bias)
    return onednn_linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` without the native kernel: oneDNN (plain or packed weight), else F.linear."""
    if weight.is_mkldnn:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return x.new_empty(*lead, weight.shape[0])
        out = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), weight, bias, "none", [], "")
        return out.view(*lead, weight.shape[0])
    if (x.device.type == "cpu" and weight.dtype == x.dtype and onednn_runs(x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and weight.is_contiguous() and x.dim() >= 1 and x.shape[-1] == weight.shape[1]):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return x.new_empty(*lead, weight.shape[0])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return out.view(*lead, weight.shape[0])
    return F.linear(x, weight, bias)
