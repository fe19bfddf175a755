"""Builds cpu_dense_small.c for this machine at first use and runs it: y = x @ W^T (+ b) for few tokens.

Why native code: a decode step's dense projections are streams over plain [N, K] weights with 1-64
tokens, and oneDNN reaches 50-70% of the memory bandwidth there even on its packed layout. The C kernel
streams each weight row once and dots it with all tokens in L1 (the cpu_moe_small.c scheme).
Built by native_build (once per weight dtype: fp32, bf16); without a compiler (or with
MARSERVE_NATIVE_DENSE=0 / MARSERVE_NATIVE=0) `available()` is False and cpu_linear uses oneDNN.
Threads: OpenMP inside the kernel, a contiguous slice of the N rows per thread; the library links
libgomp by soname, so it shares the runtime torch already loaded.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from marserve_kernels import native_build

_SOURCE = Path(__file__).with_name("cpu_dense_small.c")
# Weight bytes per thread below which small_linear stays on fewer threads. Measured (cold weights, T=1 and 8,
# 1 vs 2 threads): 32 KiB 5.6 vs 6.1 us, 64 KiB 6.8 vs 7.0, 128 KiB 9.4 vs 8.7, 256 KiB 16.0 vs 14.1,
# 1 MiB 49.7 vs 35.4: the second thread pays from 128 KiB.
SPLIT_BYTES = 2**16
_fns: dict[torch.dtype, object] = {}  # weight dtype -> its dense_small entry point (a dict lookup per call)

# weight dtype -> extra compiler flags of its build
VARIANTS = {torch.float32: [], torch.bfloat16: ["-DWEIGHT_BF16"]}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dense_small.argtypes = [p, i64, p, p, p, i64, i64, i64, i64]
    lib.dense_small.restype = None


_KERNEL = native_build.Kernel(_SOURCE, VARIANTS, "MARSERVE_NATIVE_DENSE", _declare)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True if the kernel for weights of `dtype` (fp32 or bf16) is built (building it on first call)."""
    lib = _KERNEL.lib(dtype)
    if lib is not None:
        _fns[dtype] = lib.dense_small
    return lib is not None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for `dtype` is not built here, in one line (building it on first call), or None when it is
    (then small_linear takes `dtype`, as after available())."""
    return None if available(dtype) else _KERNEL.reason(dtype)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 threads: int | None = None) -> torch.Tensor:
    """x [..., K] (any float dtype, any strides), weight [N, K] contiguous fp32 or bf16 on the CPU,
    bias [N] | None -> [..., N] in x's dtype; same result as F.linear (fp32 accumulation).

    Written for the ~1 us per call it adds: a decode step makes several calls per layer, and a call on
    a small weight takes only ~10-20 us in all."""
    fn = _fns.get(weight.dtype)
    if fn is None:
        raise RuntimeError(f"native dense kernel for {weight.dtype} not available: call available(dtype) first")
    N, K = weight.shape
    assert weight.is_contiguous() and x.shape[-1] == K
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    T = x2.shape[0]
    ldx, step = x2.stride()
    if step != 1 or (T > 1 and ldx < K):
        x2 = x2.contiguous()
        ldx = K
    out = torch.empty((T, N))
    if K == 0:  # nothing to sum: the kernel would leave out unwritten
        out.zero_()
        if bias is not None:
            out += bias.float()
    elif T > 0:
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        if threads is None:
            threads = max(1, min(torch.get_num_threads(), weight.numel() * weight.element_size() // SPLIT_BYTES))
        fn(x2.data_ptr(), ldx, weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
           T, K, N, threads)
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], N)
