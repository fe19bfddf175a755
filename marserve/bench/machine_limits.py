"""Measures this machine's limits in the current process: memory bandwidth and fp32 matmul peak.

Each limit is the best this machine shows with any implementation at hand, so a share of it is
honest: bandwidth is the read rate of a buffer far larger than the caches (what streaming weights
needs), the faster of torch's sum() and marserve_kernels' native read loop (the copy rate is reported
beside it), and the matmul peak is the faster of MKL's GEMM (what F.linear uses) and oneDNN's (what
marserve_kernels.cpu_linear uses) on a large square product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from marserve_kernels import cpu_features


@dataclass
class MachineLimits:
    bandwidth_gbs: float  # GB/s reading a large buffer (the limit for streaming weights)
    matmul_gflops: float  # fp32 GFLOP/s of a large square matmul, best implementation
    threads: int
    copy_gbs: float = 0.0  # GB/s copying a large buffer, read + write bytes counted
    mkl_gflops: float = 0.0  # torch.mm (MKL here)
    onednn_gflops: float = 0.0  # oneDNN inner product
    isa: str = ""  # cpu_features.describe(): the ISA the kernels are built for, and the CPU

    def describe(self) -> str:
        return (f"{self.bandwidth_gbs:.1f} GB/s memory read bandwidth (copy {self.copy_gbs:.1f} GB/s), "
                f"{self.matmul_gflops:.0f} GFLOP/s fp32 matmul peak (MKL mm {self.mkl_gflops:.0f}, "
                f"oneDNN {self.onednn_gflops:.0f}), {self.threads} threads; ISA {self.isa}")


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _read_gbs(buf: torch.Tensor, repeats: int) -> float:
    """Read rate over buf: the faster of torch's sum() and marserve_kernels' native read loop (on these
    machines the native loop reads ~20% faster, and the limit must be the best rate seen)."""
    from marserve_kernels import cpu_moe_native
    torch_gbs = buf.numel() * 4 / _best(lambda: buf.sum(), repeats) / 1e9
    if not cpu_moe_native.available(torch.float32):
        return torch_gbs
    return max(torch_gbs, cpu_moe_native.read_bandwidth_gbs(buf, repeats))


def measure(repeats: int = 5, buffer_mb: int = 512, matmul_n: int = 2048) -> MachineLimits:
    n = buffer_mb * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    read_gbs = _read_gbs(src, repeats)
    copy_s = _best(lambda: dst.copy_(src), repeats)
    src = dst = None  # free the 1 GiB of buffers before the matmuls
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    out = torch.empty(matmul_n, matmul_n)
    flops = 2 * matmul_n**3
    mkl = flops / _best(lambda: torch.mm(a, b, out=out), repeats) / 1e9
    onednn = 0.0
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        bt = b.t().contiguous()  # [N, K] weight layout: a @ b == linear(a, b^T)
        onednn = flops / _best(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""),
                               repeats) / 1e9
    return MachineLimits(bandwidth_gbs=read_gbs, matmul_gflops=max(mkl, onednn),
                         threads=torch.get_num_threads(), copy_gbs=2 * n * 4 / copy_s / 1e9,
                         mkl_gflops=mkl, onednn_gflops=onednn, isa=cpu_features.describe())


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of this machine's largest CPU cache (sysfs; `default` where it cannot be read). Hosts here range
    from 32 MiB to 480 MiB of L3: a buffer read to push weights out of the caches must be sized from it."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=default)


class BandwidthProbe:
    """A quick read-bandwidth reading (best of a few reads of a buffer far larger than the caches), to
    take beside each timed run: on a shared host the bandwidth moves by 2x within minutes, so a share
    of the limit is only meaningful against the limit of the same moment."""

    def __init__(self, buffer_mb: int = 256):
        self._buf = torch.ones(buffer_mb * 2**20 // 4)

    def read_gbs(self, repeats: int = 3) -> float:
        """The faster of torch's sum() and the native read loop over the buffer."""
        return _read_gbs(self._buf, repeats)


if __name__ == "__main__":
    print(measure().describe())
