"""`marserve bench linear`: the CPU linear layer's speed-ups, measured on cold weights.

A decode step reads every weight once, from memory (the model is far larger than the caches), so the
benchmark cycles through a set of weight matrices larger than the last-level cache, shaped like one
layer of the bench model (q/k/v/o projections and an expert's gate/up and down), and times
y = x @ W^T for all of them with: MKL (F.linear) or oneDNN (marserve_kernels.cpu_linear), on normal
4 KiB pages or on 2 MiB huge pages (marserve.hugepages), oneDNN on packed weights (cpu_linear.pack: what
the engine runs when the native kernel is unavailable), and the native few-token kernel
(marserve_kernels.cpu_dense_native, plain weights on huge pages: what the engine runs up to
cpu_linear.NATIVE_MAX_TOKENS tokens, oneDNN on the same plain weights above). Best of --repeats, the
implementations interleaved within each repeat (the machine is shared); both limits measured in the same run.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from marserve import hugepages, progress
from marserve.bench.machine_limits import measure
from marserve_kernels import cpu_dense_native
from marserve_kernels.cpu_linear import onednn_linear, pack

# (N, K) of one layer of the bench model: q, k, v, o (hidden 512, 8/4 heads of 64), expert w13 and w2.
LAYER_SHAPES = [(512, 512), (256, 512), (256, 512), (512, 512), (3072, 512), (512, 1536)]


def _weights(layers: int, huge: bool) -> list[torch.Tensor]:
    out = []
    for _ in range(layers):
        for n, k in LAYER_SHAPES:
            w = hugepages.empty((n, k), torch.float32) if huge else torch.empty(n, k)
            out.append(w.copy_(torch.randn(n, k)))
    return out


def _time(runs, x_by_k, repeats: int) -> list[float]:
    """Best seconds per pass of each (fn, weights) in runs; each repeat times every run once, in turn."""
    for fn, weights in runs:
        fn(x_by_k[weights[0].shape[1]], weights[0])
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, (fn, weights) in enumerate(runs):
            t0 = time.perf_counter()
            for w in weights:
                fn(x_by_k[w.shape[1]], w)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with progress.stage("bench linear: measuring the machine's limits"):
        limits = measure()
    print(f"machine: {limits.describe()}")
    with progress.stage(f"bench linear: making {args.layers} layers of weights (4K and huge pages, packed)"):
        sets = {"4K pages": _weights(args.layers, False), "huge pages": _weights(args.layers, True)}
        packed = [pack(w) for w in sets["huge pages"]]
    nbytes = sum(w.numel() * 4 for w in sets["4K pages"])
    print(f"weights: {len(sets['4K pages'])} matrices, {nbytes / 2**20:.0f} MiB per pass "
          f"(> the last-level cache, so every pass reads memory)")
    header = f"{'T':>5} {'implementation':<10} {'pages':<10} {'ms':>8} {'GB/s':>7} {'of BW':>6} {'GFLOP/s':>8} " \
             f"{'of peak':>7} {'vs MKL 4K':>9}"
    print(header)
    for T in (int(t) for t in args.tokens.split(",")):
        x_by_k = {k: torch.randn(T, k) for k in {k for _, k in LAYER_SHAPES}}
        base = None
        runs = [(impl, fn, pages, weights) for impl, fn in (("MKL", F.linear), ("oneDNN", onednn_linear))
                for pages, weights in sets.items()] + [("oneDNN", onednn_linear, "packed", packed)]
        if cpu_dense_native.available(torch.float32):
            runs.append(("native", cpu_dense_native.small_linear, "huge pages", sets["huge pages"]))
        with progress.stage(f"bench linear: T={T}, {len(runs)} implementations x {args.repeats} repeats"):
            times = _time([(fn, weights) for _, fn, _, weights in runs], x_by_k, args.repeats)
        for (impl, fn, pages, weights), s in zip(runs, times):
            base = base or s
            gbs = nbytes / s / 1e9
            gflops = 2 * T * nbytes / 4 / s / 1e9
            print(f"{T:>5} {impl:<10} {pages:<10} {s * 1e3:>8.2f} {gbs:>7.1f} "
                  f"{gbs / limits.bandwidth_gbs:>6.0%} {gflops:>8.0f} {gflops / limits.matmul_gflops:>7.0%} "
                  f"{base / s:>8.2f}x")
    print(f"command: marserve bench linear --tokens {args.tokens} --layers {args.layers} --repeats {args.repeats} "
          f"--threads {torch.get_num_threads()}")
    return 0
