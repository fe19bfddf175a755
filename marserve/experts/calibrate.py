"""Calibration: run sample text through a checkpoint, record its routing, and derive its expert preferences.

From the routing trace it computes, per MoE layer, the usage (share of routed slots per expert), S prototypes per
expert (spherical k-means of the unit-normalised router inputs the expert took) and the learned lookahead
predictors (predictors.fit_linear), and `marserve calibrate` writes them to mar_preferences.safetensors. Nothing
here changes a weight or a routing decision: the model only runs forward with an observer attached.

Legend: N=trace tokens, E=experts, K=experts per token, S=prototype slots, H=hidden, D=lookahead distance.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from marserve import progress
from marserve.analysis.routing import RoutingRecorder
from marserve.attention import AttentionMetadata
from marserve.experts.predictors import fit_linear
from marserve.experts.preferences import EMBED, ExpertPreferences, LayerPreferences

DEFAULT_CORPUS = "/tmp/marserve-corpus"  # where `marserve train` builds it too


@dataclass
class RoutingTrace:
    """What the MoE layers saw and chose, in moe_blocks() order, for the same N tokens."""

    tokens: torch.Tensor  # [N] token ids
    embed: torch.Tensor  # [N,H] f32 token embeddings
    x: list[torch.Tensor]  # per MoE position: [N,H] f32 router inputs
    ids: list[torch.Tensor]  # per MoE position: [N,K] chosen experts


def corpus_texts(corpus_dir: str = DEFAULT_CORPUS) -> dict[str, list[str]]:
    """{domain: [training text]} of the bundled corpus (built there first if missing, ~100 s)."""
    from marserve.data.corpus import build
    if not glob.glob(os.path.join(corpus_dir, "*.train.txt")):
        with progress.stage(f"building the corpus in {corpus_dir}"):
            build(corpus_dir)
    out = {}
    for path in sorted(glob.glob(os.path.join(corpus_dir, "*.train.txt"))):
        with open(path, encoding="utf-8") as f:
            out[os.path.basename(path).split(".")[0]] = [f.read(400_000)]  # far more than any --tokens needs
    return out


def token_windows(tokenizer, texts: dict[str, list[str]], tokens: int, seq_len: int) -> list[list[int]]:
    """Windows of at most seq_len tokens, an equal share of `tokens` from every domain."""
    share = max(1, tokens // max(1, len(texts)))
    windows = []
    for domain_texts in texts.values():
        ids: list[int] = []
        for t in domain_texts:
            ids += tokenizer.encode(t).ids
            if len(ids) >= share:
                break
        ids = ids[:share]
        windows += [ids[s:s + seq_len] for s in range(0, len(ids), seq_len) if ids[s:s + seq_len]]
    return windows


@torch.no_grad()
def record_trace(model, windows: list[list[int]], windows_per_pass: int = 8, desc: str = "routing trace") -> RoutingTrace:
    """Run the windows through the model (dense attention, a few windows per pass) with a recorder attached."""
    blocks = model.moe_blocks()
    rec = RoutingRecorder()
    previous = [b.routing_observer for b in blocks]
    for b in blocks:
        b.routing_observer = rec
    try:
        for s in progress.bar(range(0, len(windows), windows_per_pass), desc=desc, unit="pass"):
            group = windows[s:s + windows_per_pass]
            ids = torch.tensor([t for w in group for t in w])
            positions = torch.cat([torch.arange(len(w)) for w in group])
            model(ids, positions, AttentionMetadata.dense([len(w) for w in group]))
    finally:
        for b, obs in zip(blocks, previous):
            b.routing_observer = obs
    tokens = torch.tensor([t for w in windows for t in w])
    return RoutingTrace(tokens, model.model.embed_tokens(tokens).float(),
                        [torch.cat(rec.x[b.layer_idx]) for b in blocks], [torch.cat(rec.ids[b.layer_idx]) for b in blocks])


def usage_of(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [N,K] -> [E] share of routed slots per expert (sums to 1)."""
    counts = torch.bincount(ids.flatten().long(), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1)


def prototypes_of(x: torch.Tensor, ids: torch.Tensor, num_experts: int, slots: int, iters: int = 10,
                  seed: int = 0) -> torch.Tensor:
    """Spherical k-means of the unit router inputs each expert took: x [N,H], ids [N,K] -> [E,S,H] unit vectors.

    An expert that took fewer than S tokens repeats its centres (or, if it took none, gets random unit vectors:
    it is no one's prototype, as MAR's own memory starts)."""
    g = torch.Generator().manual_seed(seed)
    xn = F.normalize(x.float(), dim=-1)
    out = torch.empty(num_experts, slots, x.shape[1])
    for e in range(num_experts):
        pts = xn[(ids == e).any(dim=1)]
        if len(pts) == 0:
            out[e] = F.normalize(torch.randn(slots, x.shape[1], generator=g), dim=-1)
            continue
        centres = pts[torch.randperm(len(pts), generator=g)[:slots]]
        for _ in range(iters):
            assign = (pts @ centres.t()).argmax(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, pts)
            moved = sums.norm(dim=-1) > 0
            centres = torch.where(moved[:, None], F.normalize(sums, dim=-1), centres)
        out[e] = centres[torch.arange(slots) % len(centres)]
    return out


def fit_predictors(trace: RoutingTrace, num_experts: int, lookahead: int, layer_ids: list[int]) -> tuple[dict, dict]:
    """Learned predictors for every (source, distance): ({layer_idx: {d: LinearPredictor}}, {d: embed predictor})."""
    n = len(trace.x)
    pairs = [(i, d) for i in [EMBED] + list(range(n)) for d in range(1, lookahead + 1) if 0 <= i + d < n]
    ahead: dict[int, dict] = {l: {} for l in layer_ids}
    embed = {}
    for i, d in progress.bar(pairs, desc="fitting predictors", unit="map"):
        fitted = fit_linear(trace.embed if i == EMBED else trace.x[i], trace.ids[i + d], num_experts)
        if i == EMBED:
            embed[d] = fitted
        else:
            ahead[layer_ids[i]][d] = fitted
    return ahead, embed


def calibrate(model, trace: RoutingTrace, lookahead: int = 3, slots: int | None = None) -> ExpertPreferences:
    """Preferences measured on a trace: usage, prototypes and lookahead predictors for every MoE layer."""
    blocks = model.moe_blocks()
    E = blocks[0].experts.num_experts
    if slots is None:
        slots = model.config.mar.memory_slots if model.config.mar is not None else 8
    layer_ids = [b.layer_idx for b in blocks]
    ahead, embed = fit_predictors(trace, E, lookahead, layer_ids)
    layers = {l: LayerPreferences(usage_of(trace.ids[i], E), prototypes_of(trace.x[i], trace.ids[i], E, slots),
                                  ahead[l]) for i, l in enumerate(layer_ids)}
    meta = {"tokens": str(len(trace.tokens)), "lookahead": str(lookahead), "slots": str(slots),
            "model_type": model.config.model_type}
    return ExpertPreferences(layers, embed, source="calibration", metadata=meta)
