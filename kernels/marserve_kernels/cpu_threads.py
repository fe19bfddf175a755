"""Worker threads for the CPU MoE path: independent pieces of work run side by side, each single-threaded.

Why: one expert's GEMM split across both cores by OpenMP reaches ~75% of the fp32 peak at MoE shapes
(128 x 1024 x 5632) and collapses when another process takes a core (threads spin at barriers);
two experts at a time, one per core, each GEMM single-threaded, reach ~90% of the per-core peak and
degrade gracefully. Each worker sets its own OpenMP thread count to 1 (a per-thread setting, so the
caller's torch.get_num_threads() is untouched); torch ops and ctypes calls release the GIL.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0
_omp_set_num_threads = None
_checked = False


def _openmp_setter():
    """omp_set_num_threads of the OpenMP runtime torch itself loaded, or None if not found."""
    global _omp_set_num_threads, _checked
    if not _checked:
        _checked = True
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        for name in sorted(os.listdir(lib_dir)) if os.path.isdir(lib_dir) else []:
            if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
                try:
                    _omp_set_num_threads = ctypes.CDLL(os.path.join(lib_dir, name)).omp_set_num_threads
                    break
                except (OSError, AttributeError):
                    continue
    return _omp_set_num_threads


def can_run_single_threaded_workers() -> bool:
    """True if torch ops in worker threads can be pinned to one OpenMP thread each (else oversubscription)."""
    return _openmp_setter() is not None


def _init_worker():
    setter = _openmp_setter()
    if setter is not None:
        setter(1)


def pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    if _pool is None or _pool_size != workers or _pool_pid != os.getpid():
        if _pool is not None and _pool_pid == os.getpid():
            _pool.shutdown(wait=False)
        # A forked child inherits the pool object but not its threads: it must build its own.
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="marserve-moe", initializer=_init_worker)
        _pool_size, _pool_pid = workers, os.getpid()
    return _pool


def run_parallel(fn, parts: list) -> None:
    """fn(part) for every part, all on worker threads (one per part), re-raising the first error.

    Grad and inference modes are thread-local in torch: the workers take the caller's.
    """
    if len(parts) == 1:
        fn(parts[0])
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def call(part):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(part)

    futures = [pool(len(parts)).submit(call, p) for p in parts]
    for f in futures:
        f.result()
