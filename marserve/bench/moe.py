"""`marserve bench moe`: one MoE layer's expert computation timed for our CPU path, transformers and a naive loop.

All three get the same hidden states, the same expert weights (the very same tensors) and the same routing
(top-k weights and ids from a random router, renormalised as Mixtral does), so what is timed is the expert
computation alone: router excluded on every side. After one warm-up, each round times every side once, in
turn, caches flushed before each call (a read of twice the last-level cache); the best of --repeats rounds
is reported. The machine's limits are measured in the same run, before, between and after the timings
(best kept). Legend: T=tokens, E=experts, K=active per token, H=hidden, I=expert intermediate.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from marserve import progress
from marserve.bench.machine_limits import last_level_cache_bytes, measure


@dataclass(frozen=True)
class MoeShape:
    name: str
    hidden: int  # H
    intermediate: int  # I (per expert)
    num_experts: int  # E
    top_k: int  # K
    model_type: str = "mixtral"  # whose transformers experts module is the baseline

    def __post_init__(self):
        if min(self.hidden, self.intermediate, self.num_experts, self.top_k) < 1:
            raise SystemExit(f"shape {self.name}: sizes must be positive, got {self}")
        if self.top_k > self.num_experts:
            raise SystemExit(f"shape {self.name}: top-k {self.top_k} exceeds the {self.num_experts} experts")

    def expert_bytes(self, element_size: int) -> int:
        """Bytes of one expert's weights: w13 [2I, H] + w2 [H, I]."""
        return 3 * self.hidden * self.intermediate * element_size

    def flops(self, tokens: int) -> int:
        """Multiply-adds x2 of the T*K expert evaluations (gate, up and down matmuls)."""
        return 2 * tokens * self.top_k * 3 * self.hidden * self.intermediate


BENCH_SHAPE = MoeShape("bench", hidden=1024, intermediate=2816, num_experts=32, top_k=2)


def _default_model_shape() -> MoeShape:
    from marserve import DEFAULT_MODEL_DIR
    cfg = json.loads((Path(DEFAULT_MODEL_DIR) / "config.json").read_text())
    return MoeShape("default", hidden=cfg["hidden_size"],
                    intermediate=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                    num_experts=cfg.get("num_local_experts") or cfg["num_experts"],
                    top_k=cfg["num_experts_per_tok"], model_type=cfg["model_type"])


def parse_shape(spec: str) -> MoeShape:
    """'bench', 'default', or 'HxIxExK' (e.g. 64x128x4x2)."""
    if spec == "bench":
        return BENCH_SHAPE
    if spec == "default":
        return _default_model_shape()
    try:
        h, i, e, k = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {spec!r} is not 'bench', 'default' or HxIxExK such as 64x128x4x2") from None
    return MoeShape(spec, hidden=h, intermediate=i, num_experts=e, top_k=k)


def _transformers_experts(shape: MoeShape, w13: torch.Tensor, w2: torch.Tensor, implementation: str):
    """transformers' own experts module for this architecture, holding our weight tensors (no copy)."""
    import importlib

    from transformers import AutoConfig
    cfg = AutoConfig.for_model(shape.model_type, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                               moe_intermediate_size=shape.intermediate, num_local_experts=shape.num_experts,
                               num_experts=shape.num_experts, num_experts_per_tok=shape.top_k)
    cfg._experts_implementation = implementation
    mod = importlib.import_module(f"transformers.models.{shape.model_type}.modeling_{shape.model_type}")
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("Experts") and not n.startswith("_"))
    experts = cls(cfg).eval()
    experts.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return lambda x, w, ids: experts(x, ids, w)


def naive_moe(hidden, w13, w2, topk_weights, topk_ids):
    """A loop over all E experts: boolean mask of the tokens routed to e, F.linear gate/up/down, index_add."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        token_idx, slot = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden[token_idx], w13[e]).split(inter, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y)
    return out


def bare_gemms(hidden, w13, w2, topk_ids):
    """Only the two GEMMs per active expert, on pre-gathered inputs, split across workers as our path does.

    Their time is the floor for any path built on these GEMMs, so FLOPs / this time is the ceiling share.
    """
    from marserve_kernels import cpu_threads
    from marserve_kernels.cpu_linear import linear
    from marserve_kernels.cpu_moe import _balance
    counts = torch.bincount(topk_ids.reshape(-1), minlength=w13.shape[0]).tolist()
    jobs = [(e, 0, n) for e, n in enumerate(counts) if n]
    g = torch.Generator().manual_seed(1)
    xs = {e: torch.randn(n, w13.shape[2], generator=g) for e, _, n in jobs}  # [n, H]
    acts = {e: torch.randn(n, w2.shape[2], generator=g) for e, _, n in jobs}  # [n, I]

    def run(part):
        for e, _, _ in part:
            linear(xs[e], w13[e])
            linear(acts[e], w2[e])
    workers = min(torch.get_num_threads(), len(jobs))
    parts = _balance(jobs, workers) if cpu_threads.can_run_single_threaded_workers() and workers > 1 else [jobs]
    return lambda: cpu_threads.run_parallel(run, parts)


_FLUSH = None


def _flush_caches() -> None:
    """Read a buffer twice the size of this machine's last-level cache (at least 64 MiB): the next timed call
    finds its weights cold, as a decode step does (it streams each layer's experts once), instead of partly
    cached by the previous repeat."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(max(64 * 2**20, 2 * last_level_cache_bytes()) // 4)
    _FLUSH.sum()


def _best_ms_each(fns: dict, repeats: int) -> dict:
    """name -> best ms over `repeats` rounds; each round times every fn once, in turn, caches flushed before each.

    Interleaving matters on a shared machine: a burst of someone else's work then slows every side alike.
    """
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, oneDNN primitive creation
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            _flush_caches()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t * 1e3 for name, t in best.items()}


def _routing(shape: MoeShape, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing from random logits: softmax, top-k, renormalised -> (weights [T,K] f32, ids [T,K])."""
    probs = torch.softmax(torch.randn(tokens, shape.num_experts, generator=g), dim=-1)
    weights, ids = torch.topk(probs, shape.top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def bench_shape(shape: MoeShape, tokens: list[int], repeats: int, skip_naive: bool, packed: bool = False) -> list[dict]:
    """Raw times per T (ms) for every side; shares of the machine's limits are added by the caller."""
    g = torch.Generator().manual_seed(0)
    H, I, E = shape.hidden, shape.intermediate, shape.num_experts
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5  # [E, 2I, H]
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5  # [E, H, I]
    hf = {impl: _transformers_experts(shape, w13, w2, impl) for impl in ("eager", "grouped_mm")}
    from marserve_kernels import cpu_moe
    rows = []
    added = 0
    if packed and max(tokens) >= 256:
        added = cpu_moe.pack_experts(w13, w2)
    try:
        for T in tokens:
            with progress.stage(f"bench moe: shape {shape.name}, T={T}"):
                rows.append(_bench_tokens(shape, T, g, w13, w2, hf, repeats, skip_naive, added))
    finally:
        if added:
            cpu_moe.unpack_experts(w13, w2)
            cpu_moe.use_packed_experts(True)
    return rows


def _bench_tokens(shape, T, g, w13, w2, hf, repeats, skip_naive, packed_bytes) -> dict:
    import marserve_kernels
    from marserve_kernels import cpu_moe
    x = torch.randn(T, shape.hidden, generator=g)  # [T, H]
    weights, ids = _routing(shape, T, g)

    def ours(use_packed: bool):
        cpu_moe.use_packed_experts(use_packed)
        return marserve_kernels.moe(x, w13, w2, weights, ids)

    fns = {"ours": lambda: ours(False)}
    fns.update({impl: (lambda f=f: f(x, weights, ids)) for impl, f in hf.items()})
    if not skip_naive:
        fns["naive"] = lambda: naive_moe(x, w13, w2, weights, ids)
    if T >= 256:
        fns["bare_gemms"] = bare_gemms(x, w13, w2, ids)
        if packed_bytes:
            fns["packed"] = lambda: ours(True)
    with torch.inference_mode():
        want = naive_moe(x, w13, w2, weights, ids)
        for name in ("ours", "packed"):  # never time a wrong answer
            if name in fns:
                torch.testing.assert_close(fns[name](), want, atol=1e-3, rtol=1e-3)
        ms = _best_ms_each(fns, repeats)
    hf_impl = min(hf, key=ms.get)
    touched = int(ids.unique().numel())
    row = {"shape": shape.name, "tokens": T, "ours_ms": ms["ours"], "transformers_ms": ms[hf_impl],
           "transformers_impl": hf_impl, "transformers_all_ms": {i: ms[i] for i in hf},
           "naive_ms": ms.get("naive"), "bare_gemms_ms": ms.get("bare_gemms"), "touched_experts": touched,
           "weight_bytes": touched * shape.expert_bytes(w13.element_size()), "flops": shape.flops(T)}
    if "packed" in ms:
        row.update(packed_ms=ms["packed"], packed_extra_bytes=packed_bytes)
    return row


def _print_rows(rows: list[dict], limits) -> None:
    for r in rows:
        ours, T = r["ours_ms"], r["tokens"]
        r["bandwidth_share"] = r["weight_bytes"] / (ours * 1e-3) / 1e9 / limits.bandwidth_gbs
        r["matmul_share"] = r["flops"] / (ours * 1e-3) / 1e9 / limits.matmul_gflops
        naive_txt = "" if r["naive_ms"] is None else f" | naive {r['naive_ms']:9.2f} ms ({r['naive_ms'] / ours:5.2f}x)"
        line = (f"  T={T:5d}: ours {ours:9.2f} ms | transformers {r['transformers_ms']:9.2f} ms "
                f"[{r['transformers_impl']}] ({r['transformers_ms'] / ours:5.2f}x){naive_txt} | "
                f"{r['touched_experts']:3d} experts, {r['weight_bytes'] / 1e6:7.1f} MB -> "
                f"{r['bandwidth_share']:4.0%} of bandwidth | {r['flops'] / 1e9:6.2f} GFLOP -> "
                f"{r['matmul_share']:4.0%} of matmul peak")
        if r["bare_gemms_ms"] is not None:
            r["bare_gemms_share"] = r["flops"] / (r["bare_gemms_ms"] * 1e-3) / 1e9 / limits.matmul_gflops
            line += f" (its bare GEMMs alone: {r['bare_gemms_share']:4.0%})"
        print(line)
        if "packed_ms" in r:
            r["packed_matmul_share"] = r["flops"] / (r["packed_ms"] * 1e-3) / 1e9 / limits.matmul_gflops
            print(f"  T={T:5d}: ours with pack_experts() (opt-in, +{r['packed_extra_bytes'] / 1e6:.0f} MB) "
                  f"{r['packed_ms']:9.2f} ms ({r['transformers_ms'] / r['packed_ms']:5.2f}x transformers) -> "
                  f"{r['packed_matmul_share']:4.0%} of matmul peak")


def _limits(quick: bool):
    """The machine's limits (measure() reads bandwidth with torch's sum and the native read loop, the faster counts)."""
    return measure(repeats=2, buffer_mb=64, matmul_n=512) if quick else measure()


def run(args) -> int:
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    with progress.stage("bench moe: measuring the machine's limits"):
        samples = [_limits(args.quick)]
    results = {}
    for shape in shapes:
        results[shape] = bench_shape(shape, tokens, repeats, args.skip_naive, packed=not args.no_packed)
        with progress.stage("bench moe: measuring the machine's limits again"):
            samples.append(_limits(args.quick))
    # Limits measured before, between and after the timings; the best of each is the machine's limit
    # (a share of a limit measured while someone else was using the machine would flatter us).
    limits = samples[0]
    for field in ("bandwidth_gbs", "matmul_gflops", "copy_gbs", "mkl_gflops", "onednn_gflops"):
        setattr(limits, field, max(getattr(s, field) for s in samples))
    print(f"machine (best of {len(samples)} measurements around the timings): {limits.describe()}; the read "
          "bandwidth is the best of torch's sum and the native kernel's own loads over the same buffer")
    print("timed: expert computation only, same weights and routing on every side (router excluded); "
          "ratios are transformers/ours and naive/ours; transformers = the faster of its 'eager' and "
          "'grouped_mm' experts implementations; fp32; every side timed in turn in each round, caches "
          f"flushed before each timed call; best of {repeats} rounds")
    for shape, rows in results.items():
        print(f"shape {shape.name}: H={shape.hidden} I={shape.intermediate} E={shape.num_experts} "
              f"K={shape.top_k} ({shape.model_type} experts module), "
              f"{shape.expert_bytes(4) / 1e6:.1f} MB per expert")
        _print_rows(rows, limits)
    print("command: marserve bench moe " + " ".join(shlex.quote(a) for a in sys.argv[3:]))
    print(json.dumps({"limits": limits.__dict__, "results": [r for rows in results.values() for r in rows]}))
    return 0
