"""Measures a placement on real routing: records which experts a model picks for held-out text, then counts
how many token-to-expert assignments stay on the token's rank and how many bytes cross ranks per token.

Legend: L=MoE layers, T=tokens, K=experts per token, N=ranks, H=hidden.
The token's rank is defined in marserve/experts/placement.py (batch position at the first MoE layer, then
the rank of the token's top-1 expert at the previous layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from marserve.experts.placement import Placement


@dataclass
class PlacementMetrics:
    local_share: float  # share of (token, expert) assignments whose expert sits on the token's rank
    messages_per_token: float  # hidden vectors one token sends to other ranks, all MoE layers, one way
    bytes_per_token: float  # dispatch + combine: 2 x messages x H x element size


def first_layer_ranks(lengths: list[int], num_ranks: int) -> torch.Tensor:
    """[T] rank of each token at the first MoE layer: each pass of n tokens split into N contiguous shares."""
    return torch.cat([torch.arange(n) * num_ranks // n for n in lengths])


def token_ranks(placement: Placement, ids: list[torch.Tensor], first: torch.Tensor) -> list[torch.Tensor]:
    """The token's rank at each MoE layer [T] (layer 0: `first`; then the rank of its previous top-1 expert)."""
    out = [first]
    for l in range(1, len(ids)):
        out.append(placement.ranks[l - 1][ids[l - 1][:, 0].long()])
    return out


def evaluate(placement: Placement, ids: list[torch.Tensor], first: torch.Tensor, hidden_size: int,
             element_size: int) -> PlacementMetrics:
    """ids: per MoE layer the top-k ids [T,K] of the same tokens; first: [T] ranks at the first layer."""
    local = total = messages = 0
    T = first.numel()
    for l, (t, home) in enumerate(zip(ids, token_ranks(placement, ids, first))):
        expert_ranks = placement.ranks[l][t.long()]  # [T,K]
        local += int((expert_ranks == home[:, None]).sum())
        total += expert_ranks.numel()
        # One message per distinct other rank (experts of a token on the same rank share one).
        onehot = torch.zeros(T, placement.num_ranks, dtype=torch.bool)
        onehot.scatter_(1, expert_ranks, True)
        onehot.scatter_(1, home[:, None], False)
        messages += int(onehot.sum())
    per_token = messages / T
    return PlacementMetrics(local / total, per_token, 2 * per_token * hidden_size * element_size)


class TraceRecorder:
    """routing_observer keeping each MoE layer's top-k ids [T,K] in call order."""

    def __init__(self):
        self.ids: dict[int, list[torch.Tensor]] = {}

    def __call__(self, layer_idx, x, z, topk_ids, topk_weights):
        self.ids.setdefault(layer_idx, []).append(topk_ids.detach().cpu())

    def layers(self) -> list[torch.Tensor]:
        return [torch.cat(self.ids[l]) for l in sorted(self.ids)]


@torch.inference_mode()
def record_trace(model, windows: list[list[int]]) -> list[torch.Tensor]:
    """Runs each window of token ids as one dense pass and returns per MoE layer the top-k ids [T,K]."""
    from marserve.attention import AttentionMetadata
    recorder = TraceRecorder()
    blocks = model.moe_blocks()
    for b in blocks:
        b.routing_observer = recorder
    try:
        for w in windows:
            model(torch.tensor(w), torch.arange(len(w)), AttentionMetadata.dense([len(w)]))
    finally:
        for b in blocks:
            b.routing_observer = None
    return recorder.layers()


def heldout_windows(tokenizer, seq_len: int, max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration, measurement) windows: each held-out domain's text, first half and second half."""
    from marserve.analysis.routing import load_prompts
    calib, measure = [], []
    for texts in load_prompts(None).values():
        ids = tokenizer.backend_tokenizer.encode("".join(texts)).ids[:max_tokens]  # no length warning
        half = len(ids) // 2
        for part, out in ((ids[:half], calib), (ids[half:], measure)):
            out += [part[i:i + seq_len] for i in range(0, len(part) - 1, seq_len) if len(part[i:i + seq_len]) > 1]
    return calib, measure


def mar_stats(model):
    """RoutingStats from the checkpoint's MAR memory and usage, or None when some MoE layer has no MAR."""
    from marserve.experts.placement import RoutingStats
    blocks = model.moe_blocks()
    if not blocks or not all(b.has_mar for b in blocks):
        return None
    memory = torch.stack([b.mar_memory.float() for b in blocks])  # [L,E,S,H]
    usage = torch.stack([b.mar_usage.float() for b in blocks])  # [L,E]
    return RoutingStats.from_mar(memory, usage)


def report(model_dir, num_ranks: int, seq_len: int = 256, max_tokens: int = 8192) -> dict:
    """Every placement of `model_dir` over `num_ranks`, measured on the second half of the held-out text
    (the trace-based `mar` is calibrated on the first half) -> {"rows": [...], ...} for `print_report`."""
    from marserve import progress
    from marserve.experts import placement as pl
    from marserve.loader import load_model, load_tokenizer
    with progress.stage(f"loading {model_dir}"):
        model, config = load_model(model_dir, dtype="float32")
        tokenizer = load_tokenizer(model_dir)
    calib_windows, measure_windows = heldout_windows(tokenizer, seq_len, max_tokens)
    with progress.stage(f"routing {sum(map(len, calib_windows + measure_windows))} held-out tokens"):
        calib = record_trace(model, calib_windows)
        measured = record_trace(model, measure_windows)
    L, E = len(measured), config.num_experts
    element_size = torch.empty((), dtype=_dtype(config.dtype)).element_size()
    first = first_layer_ranks([len(w) for w in measure_windows], num_ranks)
    usage = pl.RoutingStats.from_trace(measured, E).usage  # the load each placement really sees
    candidates = [pl.round_robin(L, E, num_ranks)]
    stats = mar_stats(model)
    if stats is not None:
        p = pl.mar(stats, num_ranks)
        p.name = "mar (MAR memory + usage)"
        candidates.append(p)
    p = pl.mar(pl.RoutingStats.from_trace(calib, E), num_ranks)
    p.name = "mar (calibration trace)"
    candidates.append(p)
    rows = []
    for p in candidates:
        m = evaluate(p, measured, first, config.hidden_size, element_size)
        rows.append({"placement": p.name, "local_share": m.local_share, "messages_per_token": m.messages_per_token,
                     "bytes_per_token": m.bytes_per_token, "load_imbalance": p.imbalance(usage),
                     "ranks": p.ranks.tolist()})
    return {"model_dir": str(model_dir), "num_ranks": num_ranks, "tokens": first.numel(), "moe_layers": L,
            "experts": E, "top_k": config.num_experts_per_tok, "hidden": config.hidden_size,
            "element_size": element_size, "rows": rows}


def _dtype(name: str) -> torch.dtype:
    from marserve.loader import DTYPES
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def print_report(r: dict) -> None:
    print(f"expert placement over {r['num_ranks']} ranks: {r['moe_layers']} MoE layers x {r['experts']} experts, "
          f"top-{r['top_k']}; measured on {r['tokens']} held-out tokens (second half of each domain)")
    print("token's rank: batch position at the first MoE layer, then the rank of its top-1 expert at the "
          f"previous layer; bytes = dispatch + combine of H={r['hidden']} x {r['element_size']} B per other rank")
    print(f"{'placement':<28} {'local':>7} {'msgs/token':>11} {'bytes/token':>12} {'load imbalance':>15}")
    for row in r["rows"]:
        print(f"{row['placement']:<28} {row['local_share']:>7.3f} {row['messages_per_token']:>11.2f} "
              f"{row['bytes_per_token']:>12.0f} {row['load_imbalance']:>14.1%}")
    base = r["rows"][0]["local_share"]
    for row in r["rows"][1:]:
        print(f"{row['placement']}: {row['local_share'] / base:.2f}x the local assignments of round_robin")


def checkpoint_mar_stats(model_dir, config):
    """RoutingStats from the MAR tensors of a checkpoint on disk (read alone, before the model is loaded), or
    None when some MoE layer has no MAR."""
    from pathlib import Path

    from safetensors import safe_open

    from marserve.experts.placement import RoutingStats
    from marserve.loader import checkpoint_files
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if not layers or not all(config.has_mar(i) for i in layers):
        return None
    files = checkpoint_files(Path(model_dir))
    block = config.moe_block_name

    def read(i, what):
        name = f"model.layers.{i}.{block}.mar.{what}"
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name).float()
    memory = torch.stack([read(i, "memory") for i in layers])
    usage = torch.stack([read(i, "usage") for i in layers])
    return RoutingStats.from_mar(memory, usage)
