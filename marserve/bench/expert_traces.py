"""The replay half of `marserve bench experts`: routing traces of the trained trace models, replayed at the sizes
of Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V2-Lite (the model itself is marserve/bench/expert_replay.py).

Each trace model is a small checkpoint trained here with the served model's expert count, top-k and MoE layer
count (`trace_model_command()` prints how). Its routing is recorded on the held-out text of every domain
(marserve/data/heldout/), in windows of `WINDOW` tokens, domain after domain: the first quarter of each domain's
windows is calibration text (the usage prior of a plain checkpoint), the rest is the replayed trace. MAR
checkpoints bring their own prior (`mar_usage`), as the store uses it.

Legend: T=tokens, L=MoE layers, K=top-k, E=experts, D=lookahead, M=experts predicted per layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from marserve.bench.expert_bound import time_floor_s
from marserve.bench.expert_replay import SERVED_MODELS, Hardware, ReplayConfig, replay
from marserve.errors import ConfigError
from marserve.experts.traces import RoutingTrace, record_text_trace

HELDOUT_DIR = Path(__file__).resolve().parent.parent / "data" / "heldout"
WINDOW = 256


def trace_model_command(name: str, out: str, mar: bool = True, steps: int = 300) -> str:
    """The `marserve train` command that makes the trace model of served model `name`."""
    s = SERVED_MODELS[name]
    return (f"marserve train --out {out} --arch {s.proxy_arch} --experts {s.num_experts} --top-k {s.top_k} "
            f"--layers {s.num_moe_layers} --hidden 64 --heads 4 --kv-heads 2 --expert-intermediate 64 "
            f"--batch-size 4 --seq-len 128 --steps {steps} --threads 1 --tokenizer marserve/default_model"
            + ("" if mar else " --no-mar"))


def _windows(tokenizer, max_tokens: int, window: int, part: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration windows, trace windows) from the held-out slices: per domain, a quarter of the windows
    (at least one) for calibration, then up to max_tokens / domains tokens for the trace. part k > 0 is a second
    (third, ...) trace on other text: it starts at the window after those parts 0..k-1 took, in each domain."""
    domains = sorted(p for p in HELDOUT_DIR.iterdir() if p.name.endswith(".heldout.txt"))
    per_domain = max(1, max_tokens // len(domains))
    calib, trace = [], []
    for path in domains:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
        n_cal = max(1, len(windows) // 4)
        calib += windows[:n_cal]
        rest = iter(windows[n_cal:])
        for k in range(part + 1):
            taken, budget = [], per_domain
            for w in rest:
                taken.append(w[:budget])
                budget -= len(taken[-1])
                if budget <= 0:
                    break
        if part > 0 and budget > 0:  # a short held-out part would not be comparable with part 0
            raise ConfigError(f"{path.name} has too few windows for trace part {part} of {max_tokens} tokens")
        trace += taken
    return calib, trace


def record(model_dir: str, name: str, work_dir: Path, max_tokens: int, lookahead: int,
           min_prob: float | None = None, part: int = 0) -> dict:
    """Trace, predictions and usage prior of one trace model; cached in work_dir (keyed by model, size and part:
    part 0 is the first slice of the held-out text, part k > 0 the k-th next one, see _windows)."""
    served = SERVED_MODELS[name]
    cache = work_dir / (f"{name}-{Path(model_dir).resolve().name}-{max_tokens}" + (f"-part{part}" if part else "")
                        + ".npz")
    # the Prefetcher's default predictor is the learned one when the model has been calibrated
    kind = "learned" if (Path(model_dir) / "mar_preferences.safetensors").exists() else "router"
    pred_cache = cache.with_suffix(f".predictions-{kind}-ahead{lookahead}-p"
                                   f"{'default' if min_prob is None else min_prob}.npy")
    if cache.exists() and pred_cache.exists():
        trace = RoutingTrace.load(cache)
        return {"trace": trace, "predictions": np.load(pred_cache), "usage": trace.usage}
    from marserve import LLM
    llm = LLM(model_dir, dtype="float32", enable_prefix_caching=False, kv_cache_gb=0.25)
    if cache.exists():  # the trace is there; only these predictions are new
        trace = RoutingTrace.load(cache)
        predictions = prefetcher_predictions(llm.model, model_dir, trace.router_inputs, lookahead, min_prob)
        np.save(pred_cache, predictions)
        return {"trace": trace, "predictions": predictions, "usage": trace.usage}
    blocks = llm.model.moe_blocks()
    if (len(blocks), blocks[0].experts.num_experts, blocks[0].top_k) != (
            served.num_moe_layers, served.num_experts, served.top_k):
        raise ConfigError(f"{model_dir} has {len(blocks)} MoE layers x {blocks[0].experts.num_experts} experts, "
                          f"top-{blocks[0].top_k}; {served.name} needs {served.num_moe_layers} x "
                          f"{served.num_experts}, top-{served.top_k}: make it with "
                          f"`{trace_model_command(name, 'DIR')}`")
    # a window is one prompt: it must leave the one output token room in the context
    window = min(WINDOW, llm.config.max_position_embeddings - 1)
    calib_windows, trace_windows = _windows(llm.tokenizer, max_tokens, window, part)
    trace = record_text_trace(llm, trace_windows, model=str(model_dir), served=name, text="heldout")
    if trace.usage is None:  # a plain checkpoint: its prior comes from calibration text, as `calibrate` does
        calib = record_text_trace(llm, calib_windows, record_inputs=False)
        counts = np.stack([np.bincount(calib.topk_ids[:, layer].ravel(), minlength=calib.num_experts)
                           for layer in range(calib.num_layers)]).astype(np.float32)
        trace.usage = counts / counts.sum(axis=1, keepdims=True)
        trace.meta["usage_from"] = "calibration"
    else:
        trace.meta["usage_from"] = "mar_usage"
    predictions = prefetcher_predictions(llm.model, model_dir, trace.router_inputs, lookahead, min_prob)
    trace.meta["predictor"] = "the engine's Prefetcher (marserve/experts/prefetcher.py), default predictor"
    work_dir.mkdir(parents=True, exist_ok=True)
    trace.save(cache)
    np.save(pred_cache, predictions)
    return {"trace": trace, "predictions": predictions, "usage": trace.usage}


def prefetcher_predictions(model, model_dir: str, router_inputs: np.ndarray, lookahead: int,
                           min_prob: float | None = None) -> np.ndarray:
    """What the engine's Prefetcher (marserve/experts/prefetcher.py, its default predictor and thresholds, with
    `lookahead`) asks for at each token and layer of a trace -> [T, L, D, M] ids, -1 padded (M = top-k).

    Each token's router input at each layer is handed to the prefetcher as at batch-1 decode, with the blocks'
    prefetch() calls caught instead of reaching a store."""
    import torch

    from marserve.experts.preferences import load_preferences
    from marserve.experts.prefetcher import Prefetcher
    blocks = model.moe_blocks()
    kw = {} if min_prob is None else {"min_prob": min_prob}  # None: the prefetcher's own default threshold
    prefetcher = Prefetcher(model, load_preferences(model_dir, model), lookahead=lookahead, **kw)
    T, L, _ = router_inputs.shape
    out = np.full((T, L, lookahead, prefetcher.per_layer), -1, np.int16)
    here = {"t": 0, "i": 0}

    def catcher(j):
        def prefetch(ids):
            ids = ids[:prefetcher.per_layer]
            out[here["t"], here["i"], j - here["i"] - 1, :len(ids)] = ids.numpy()
        return prefetch

    try:
        for j, b in enumerate(blocks):
            b.experts.prefetch = catcher(j)
        for i, b in enumerate(blocks):
            x = torch.from_numpy(router_inputs[:, i].astype(np.float32))
            here["i"] = i
            for t in range(T):
                here["t"] = t
                prefetcher.on_routing(b.layer_idx, x[t:t + 1])
    finally:
        for b in blocks:
            del b.experts.prefetch  # the class's method again
    return out


def configurations(budgets: list[float], policies: list[str]) -> list[tuple[str, float, ReplayConfig]]:
    """(label, budget, config) per row: the on-demand baselines, each policy with prefetch, then the offline bound
    (Belady on demand; run_replays adds its time floor as a row of its own)."""
    rows = []
    for b in budgets:
        rows.append(("lru on-demand", b, ReplayConfig(b, "lru")))
        rows.append(("lru on-demand, per-layer pools", b, ReplayConfig(b, "lru", per_layer=True)))
        for p in policies:
            rows.append((f"{p} + prefetch", b, ReplayConfig(b, p, prefetch=True)))
        rows.append((BELADY, b, ReplayConfig(b, "belady")))
    return rows


BELADY = "Belady on demand (offline)"
BOUND = "offline optimal (Belady), a bound"


def bound_row(row: dict, transfer_s: float) -> dict:
    """The Belady on-demand row -> the bound row: MIN's transfers, and the time floor (time_floor_s) as its time."""
    floor = time_floor_s(row["compute_s"], row["misses"], transfer_s)
    return {**row, "config": BOUND, "time_s": floor, "ms_per_token": 1e3 * floor / row["tokens"],
            "stall_s": floor - row["compute_s"]}


def run_replays(recorded: dict, name: str, budgets: list[float], policies: list[str], tiers: list[str],
                lookahead: int, hw: Hardware = Hardware()) -> list[dict]:
    served = SERVED_MODELS[name]
    ids = recorded["trace"].topk_ids
    L, E, K = served.num_moe_layers, served.num_experts, served.top_k
    minimum = min(L * E, max(K * L, E)) / (L * E)  # the store's (and so the replay's) smallest pool
    kept = []
    for b in budgets:
        if b < minimum and any(k <= minimum for k in kept):
            print(f"replay {served.name}: budget {b:g} is below the minimum {minimum:.4g}; its rows are the minimum's")
            continue
        kept.append(b)
    budgets = kept
    out = []
    for tier in tiers:
        for label, budget, cfg in configurations(budgets, policies):
            cfg = ReplayConfig(cfg.budget, cfg.policy, cfg.prefetch, lookahead=lookahead, tier=tier,
                               per_layer=cfg.per_layer)
            r = replay(ids, served, cfg, hw, predictions=recorded["predictions"], usage=recorded["usage"])
            out.append({"served": name, "tier": tier, "budget": budget, "config": label, **r.row()})
            if label == BELADY:
                out.append(bound_row(out[-1], served.expert_bytes / (hw.link_gbs(tier) * 1e9)))
    for row in out:  # against on-demand lru (shared pool) at the same tier and budget
        base = next(b for b in out if b["tier"] == row["tier"] and b["budget"] == row["budget"]
                    and b["config"] == "lru on-demand")
        row["time_vs_lru"] = row["ms_per_token"] / base["ms_per_token"]
    return out


def print_table(rows: list[dict]) -> None:
    """One line per row; xfer/tok = experts moved over the link per token (misses + prefetches)."""
    head = (f"{'model':<17} {'tier':<4} {'budget':>6} {'configuration':<33} {'hit rate':>8} {'miss/tok':>8} "
            f"{'xfer/tok':>8} {'prec':>5} {'recall':>6} {'stall ms/tok':>12} {'ms/token':>9} {'vs lru':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        budget = f"{r['budget']:.3g}" + ("*" if r["clamped"] else "")
        print(f"{SERVED_MODELS[r['served']].name:<17} {r['tier']:<4} {budget:>6} {r['config']:<33} "
              f"{r['hit_rate']:8.3f} {r['misses'] / r['tokens']:8.2f} "
              f"{(r['misses'] + r['prefetches']) / r['tokens']:8.2f} {r['precision']:5.2f} {r['recall']:6.2f} "
              f"{1e3 * r['stall_s'] / r['tokens']:12.2f} {r['ms_per_token']:9.2f} {r['time_vs_lru']:6.2f}x")


def targets(rows: list[dict]) -> list[str]:
    """Issue 20's replay target per served model, tier and budget: the best of our policies with prefetch at
    least 25% below on-demand lru in modelled time per output token."""
    lines = []
    for (served, tier, budget) in sorted({(r["served"], r["tier"], r["budget"]) for r in rows if r["budget"] < 1}):
        here = [r for r in rows if (r["served"], r["tier"], r["budget"]) == (served, tier, budget)]
        best = min((r for r in here if "prefetch" in r["config"]), key=lambda r: r["ms_per_token"])
        gain = 1 - best["time_vs_lru"]
        line = (f"replay {SERVED_MODELS[served].name} {tier} {budget:.3g}: best {best['config']} takes "
                f"{gain:.1%} less modelled time per token than on-demand lru (target >= 25%): "
                f"{'met' if gain >= 0.25 else 'NOT met'}")
        bound = next((r for r in here if r["config"] == BOUND), None)
        if bound is not None:  # how much any policy and prefetcher could take off, at most
            line += (f"; the offline bound: {bound['misses'] / bound['tokens']:.2f} transfers/token, at best "
                     f"{1 - bound['time_vs_lru']:.1%} less"
                     + ("" if bound["time_vs_lru"] <= 0.75 else ": the target is out of reach here"))
        lines.append(line)
    return lines


def default_trace_models() -> dict[str, str]:
    """name -> checkpoint from MARSERVE_TRACE_MODELS ("name=dir,..."), else none."""
    spec = os.environ.get("MARSERVE_TRACE_MODELS", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
