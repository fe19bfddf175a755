"""Measures this machine's limits in the current process: memory bandwidth and fp32 matmul peak."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class MachineLimits:
    bandwidth_gbs: float  # GB/s reading + writing a large buffer (copy counts both)
    matmul_gflops: float  # fp32 GFLOP/s of a large square matmul
    threads: int


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(repeats: int = 5, buffer_mb: int = 512, matmul_n: int = 2048) -> MachineLimits:
    n = buffer_mb * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    copy_s = _best(lambda: dst.copy_(src), repeats)
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    out = torch.empty(matmul_n, matmul_n)
    mm_s = _best(lambda: torch.mm(a, b, out=out), repeats)
    return MachineLimits(bandwidth_gbs=2 * n * 4 / copy_s / 1e9, matmul_gflops=2 * matmul_n**3 / mm_s / 1e9,
                         threads=torch.get_num_threads())


if __name__ == "__main__":
    print(measure())
