"""Builds cpu_moe_small.c for this machine at first use and runs it: the few-token fp32 MoE path.

Why native code: on this project's AMD CPUs, MKL's and oneDNN's GEMMs with 2-16 rows reach 3-25 GB/s of
the ~38 GB/s the memory gives, and decode has exactly such shapes (a few tokens per touched expert).
The C kernel streams each touched expert's rows once and dots them with all of its tokens in L1.
The library is compiled with the system C compiler (`cc -O3 -march=native`) into a per-machine cache;
without a compiler (or with MARSERVE_NATIVE_MOE=0) `available()` is False and callers use torch.
Threads: the two phases (gate/up, then down) split their output columns across Python threads; ctypes
releases the GIL, so they run in parallel. Legend: T=tokens, K=experts per token, P=T*K pairs, E=experts,
H=hidden, I=expert intermediate.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_moe_small.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_signature() -> str:
    """What -march=native depends on, so a shared cache never hands one CPU another's build."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not _SOURCE.exists():
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_signature().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MARSERVE_KERNEL_CACHE", Path.home() / ".cache" / "marserve" / "kernels"))
    target = cache / f"cpu_moe_small-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # build aside, rename: concurrent builders are safe
        os.close(fd)
        cmd = [compiler, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            logger.warning("building the native MoE kernel failed, using torch: %s", done.stderr.strip()[:500])
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moe_gate_up.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64]
    lib.moe_down.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64]
    lib.moe_gate_up.restype = lib.moe_down.restype = None
    lib.read_sum.argtypes = [p, i64, i64]
    lib.read_sum.restype = ctypes.c_double
    return lib


def available() -> bool:
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MARSERVE_NATIVE_MOE", "1") != "0" and platform.system() == "Linux":
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as e:
                logger.warning("native MoE kernel unavailable, using torch: %s", e)
                _lib = None
    return _lib is not None


def _parallel(fn, total: int, threads: int) -> None:
    """fn(begin, end) over `threads` slices of range(total): one slice here, the rest on pool threads."""
    global _pool, _pool_size
    if threads <= 1 or total < 64:
        fn(0, total)
        return
    if _pool is None or _pool_size != threads - 1:
        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="marserve-moe")
        _pool_size = threads - 1
    bounds = [total * j // threads for j in range(threads + 1)]
    futures = [_pool.submit(fn, bounds[j], bounds[j + 1]) for j in range(1, threads)]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


def small_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """hidden [T, H] fp32, w13 [E, 2I, H], w2 [E, H, I] fp32 contiguous, topk_* [T, K] -> [T, H]."""
    assert available(), "call available() first"
    T, K = topk_ids.shape
    E, two_i, H = w13.shape
    inter = two_i // 2
    flat_ids = topk_ids.reshape(-1)  # [P]
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(flat_ids, minlength=E), 0, out=offsets[1:])  # [E+1]
    pair_token = (order // K).contiguous()  # [P]
    pair_weight = topk_weights.reshape(-1).to(torch.float32).index_select(0, order)  # [P]
    x = hidden.contiguous()
    act = torch.empty(T * K, inter, dtype=torch.float32)  # [P, I]
    out = torch.zeros(T, H, dtype=torch.float32)  # [T, H]
    threads = threads or torch.get_num_threads()
    ptr = lambda t: t.data_ptr()  # noqa: E731
    _parallel(lambda a, b: _lib.moe_gate_up(ptr(x), ptr(w13), ptr(act), ptr(offsets), ptr(pair_token),
                                            E, H, inter, a, b), inter, threads)
    _parallel(lambda a, b: _lib.moe_down(ptr(act), ptr(w2), ptr(out), ptr(offsets), ptr(pair_token),
                                         ptr(pair_weight), E, H, inter, a, b), H, threads)
    return out


def read_bandwidth_gbs(buffer_mb: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """GB/s of the kernel's own vector loads over a buffer far larger than the caches, split like small_moe.

    A second opinion on the machine's read bandwidth: torch's sum() can fall short of what streaming
    code reaches, and a share of the limit is only honest if the limit is the best rate seen.
    """
    assert available(), "call available() first"
    buf = torch.ones(buffer_mb * 2**20 // 4)
    threads = threads or torch.get_num_threads()
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass is a warm-up
        t0 = time.perf_counter()
        _parallel(lambda a, b: _lib.read_sum(buf.data_ptr(), a, b), buf.numel(), threads)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9
