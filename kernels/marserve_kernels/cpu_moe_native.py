"""Builds cpu_moe_small.c for this machine at first use and runs it: the few-token MoE path (fp32/bf16 weights).

Why native code: on this project's AMD CPUs, MKL's and oneDNN's GEMMs with 2-16 rows reach 3-25 GB/s of
the ~50 GB/s the memory gives, and decode has exactly such shapes (a few tokens per touched expert).
The C kernel streams each touched expert's rows once and dots them with all of its pairs in L1.
Built by native_build (once per weight dtype); without a compiler (or with MARSERVE_NATIVE_MOE=0)
`available()` is False and callers use torch. Threads: OpenMP inside the kernel (gate/up split over I, a barrier, down
split over H); the library links libgomp by soname, so it shares the runtime torch already loaded.
Legend: T=tokens, K=experts per token, P=T*K pairs, E=experts, H=hidden, I=expert intermediate.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch

from marserve_kernels import native_build

_SOURCE = Path(__file__).with_name("cpu_moe_small.c")
SPLIT_BYTES = 2**18  # weight bytes per thread below which small_moe stays on fewer threads (measured)
# weight dtype -> extra compiler flags of its build
VARIANTS = {torch.float32: [], torch.bfloat16: ["-DWEIGHT_BF16"]}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moe_small.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64]
    lib.moe_small.restype = None
    lib.moe_routed.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64]
    lib.moe_routed.restype = ctypes.c_int
    lib.read_sum.argtypes = [p, i64, i64]
    lib.read_sum.restype = ctypes.c_double


_KERNEL = native_build.Kernel(_SOURCE, VARIANTS, "MARSERVE_NATIVE_MOE", _declare)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True if the kernel for weights of `dtype` (fp32 or bf16) is built (building it on first call)."""
    return _KERNEL.lib(dtype) is not None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for `dtype` is not built here, in one line (building it on first call), or None when it is."""
    return _KERNEL.reason(dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t itself when it already is a contiguous `dtype` tensor (the decode case), else a converted copy."""
    return t if t.dtype is dtype and t.is_contiguous() else t.to(dtype).contiguous()


def small_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I] contiguous fp32 or bf16, topk_* [T, K] -> [T, H] (hidden's dtype).

    A negative id leaves its slot out (no expert here); the sums are fp32 throughout, rounded to hidden's dtype
    once at the end (pass fp32 hidden to keep them)."""
    assert w13.dtype == w2.dtype and available(w13.dtype), "call available(weight dtype) first"
    T, K = topk_ids.shape
    E, two_i, H = w13.shape
    inter = two_i // 2
    x = _as(hidden, torch.float32)  # [T, H]: activations are fp32 inside the kernel
    ids = _as(topk_ids, torch.int64)  # [T, K]
    weights = _as(topk_weights, torch.float32)  # [T, K]
    out = torch.zeros(T, H, dtype=torch.float32)  # [T, H]
    if threads is None:
        # Below ~256 KB of weights per thread, waking another thread costs more than it saves.
        touched_bytes = min(T * K, E) * 3 * H * inter * w13.element_size()
        threads = max(1, min(torch.get_num_threads(), touched_bytes // SPLIT_BYTES))
    rc = _KERNEL.lib(w13.dtype).moe_routed(x.data_ptr(), w13.data_ptr(), w2.data_ptr(), out.data_ptr(), ids.data_ptr(),
                                     weights.data_ptr(), T, K, E, H, inter, threads)
    if rc == -1:
        raise ValueError(f"topk_ids holds an expert id above {E - 1}")
    if rc != 0:
        raise MemoryError("native MoE kernel: out of memory for its work buffers")
    return out if hidden.dtype is torch.float32 else out.to(hidden.dtype)


def read_bandwidth_gbs(buf: torch.Tensor, repeats: int = 5, threads: int | None = None) -> float:
    """GB/s of the kernel's own vector loads over `buf` (contiguous fp32, far larger than the caches), split
    like small_moe; best of `repeats` after a warm-up pass.

    A second opinion on the machine's read bandwidth: torch's sum() can fall short of what streaming
    code reaches, and a share of the limit is only honest if the limit is the best rate seen.
    """
    assert available() and buf.dtype == torch.float32 and buf.is_contiguous(), "call available() first"
    threads = threads or torch.get_num_threads()
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass is a warm-up
        t0 = time.perf_counter()
        _KERNEL.lib(torch.float32).read_sum(buf.data_ptr(), buf.numel(), threads)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9
