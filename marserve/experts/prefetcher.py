"""The prefetcher: on each MoE layer's routing, predicts the experts of the next layers and asks their providers for them.

It sits on each SparseMoeBlock's `routing_observer` (called before the block fetches its experts, also on the
per-layer CPU decode path), chaining any observer already there. On MoE position i it scores positions
i+1..i+lookahead with the predictor (predictors.py: learned maps when calibrated, else the router lookahead), keeps
each token's top `per_layer` experts (and, with `min_prob`, only those the predictor is that sure of), and calls
`model.moe_blocks()[j].experts.prefetch(ids)`, nearest layer first, the experts most tokens want first. The
provider reads them on background threads; a wrong guess costs a read, never an output (fetch() still reads
what is missing).

`before_step` (called by the engine before each forward pass) covers the first `lookahead` MoE layers, which no
earlier layer can predict: from the tokens of the step through the embedding predictor. At prefill those are
all the prompt's tokens, so the prefetch is the prompt's predicted working set of those layers; the deeper layers'
working sets follow layer by layer as the pass reaches them.

Cost: a handful of tensor ops per layer for the whole batch (no Python loop over tokens); measured per decode
step in docs/offload.md ("Prediction").
Legend: T=tokens of the pass, E=experts, n=experts predicted per token, D'=layers predicted from one layer.
"""

from __future__ import annotations

import itertools

import torch

from marserve.experts.predictors import make_predictor
from marserve.experts.preferences import EMBED, ExpertPreferences


class Prefetcher:
    def __init__(self, model, preferences: ExpertPreferences | None, lookahead: int = 1, per_layer: int | None = None,
                 min_prob: float = 0.5, predictor: str = "auto"):
        """lookahead: how many MoE layers ahead to prefetch (a slow read needs more than one layer's compute to
        hide); per_layer: experts predicted per token and layer (default: the model's top-k); min_prob: keep only
        predictions the predictor gives at least this probability (sigmoid of a learned score, softmax of router
        logits); predictor: "auto", "learned" or "router". The defaults (1 layer ahead, top-k, p >= 0.5) are the
        setting with the best recall at a precision >= 0.9 on the default model (docs/offload.md, "Prediction")."""
        if lookahead < 1:
            raise ValueError(f"lookahead must be at least 1, got {lookahead}")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {min_prob}")
        self.model = model
        self.blocks = model.moe_blocks()
        if not self.blocks:
            raise ValueError("the model has no MoE layers: nothing to prefetch")
        self.preferences = preferences
        self.predictor = make_predictor(predictor, self.blocks, preferences, lookahead)
        num_experts = self.blocks[0].experts.num_experts
        self.per_layer = min(num_experts, per_layer or self.blocks[0].top_k)
        self.min_prob = min_prob
        self.num_experts = num_experts
        self._position = {b.layer_idx: i for i, b in enumerate(self.blocks)}
        self._chained: list = []  # per MoE position: the observer that was there before install()
        self._observers: list = []
        self.num_prefetched = 0  # expert ids handed to providers (before they drop resident ones)

    # -- installation ---------------------------------------------------------------------------------------
    def install(self) -> "Prefetcher":
        if self._observers:
            return self
        for b in self.blocks:
            previous = b.routing_observer
            self._chained.append(previous)
            observer = self._observer_for(previous)
            self._observers.append(observer)
            b.routing_observer = observer
        return self

    def uninstall(self) -> None:
        """Put back the observers found at install(); if another observer was chained on top of ours since, ours
        stays in the chain but passes straight through."""
        for b, ours, previous in zip(self.blocks, self._observers, self._chained):
            if b.routing_observer is ours:
                b.routing_observer = previous
            ours.active = False
        self._observers, self._chained = [], []

    @property
    def installed(self) -> bool:
        return bool(self._observers)

    def _observer_for(self, previous):
        def observer(layer_idx, router_input, router_logits, topk_ids, topk_weights):
            if previous is not None:
                previous(layer_idx, router_input, router_logits, topk_ids, topk_weights)
            if observer.active:
                self.on_routing(layer_idx, router_input)
        observer.active = True
        return observer

    # -- prediction -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_routing(self, layer_idx: int, router_input: torch.Tensor) -> None:
        """Layer layer_idx routed x [T,H]: prefetch the predicted experts of the next `lookahead` MoE layers."""
        i = self._position[layer_idx]
        targets = self.predictor.targets(i)
        if targets:
            self._prefetch(targets, self.predictor.scores(i, router_input))

    @torch.no_grad()
    def before_step(self, input_ids_per_sequence: list[list[int]], is_prefill: list[bool]) -> None:
        """Before the forward pass: predict the first MoE layers' experts from the step's tokens (a prefilling
        sequence contributes all its ids, a decoding one its last id)."""
        targets = self.predictor.targets(EMBED)
        if not targets or not input_ids_per_sequence:
            return
        ids = list(itertools.chain.from_iterable(
            seq if prefill else seq[-1:] for seq, prefill in zip(input_ids_per_sequence, is_prefill)))
        if not ids:
            return
        embed = self.model.model.embed_tokens
        x = embed(torch.tensor(ids, device=embed.weight.device))  # [T,H]
        self._prefetch(targets, self.predictor.scores(EMBED, x))

    def _prefetch(self, targets: list[int], scores: torch.Tensor) -> None:
        """scores [D',T,E] of MoE positions `targets` -> one prefetch() per position, nearest first."""
        top, idx = scores.topk(self.per_layer, dim=-1)  # [D',T,n]
        keep = None
        if self.min_prob > 0.0:
            keep = self._probability(scores, top) >= self.min_prob  # [D',T,n]
        for d, j in enumerate(targets):
            ids = self._ranked_union(idx[d], None if keep is None else keep[d])
            if ids.numel():
                self.num_prefetched += ids.numel()
                self.blocks[j].experts.prefetch(ids)

    def _probability(self, scores: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        if self.predictor.name == "learned":  # fitted as per-expert logistic regressions
            return torch.sigmoid(top)
        return torch.exp(top - torch.logsumexp(scores, dim=-1, keepdim=True))  # the router's softmax

    def _ranked_union(self, idx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """idx [T,n] predicted ids (keep [T,n] which count) -> the distinct ids, wanted by most tokens first."""
        if idx.shape[0] == 1:  # one token (batch-1 decode): already distinct and best first
            return idx[0] if keep is None else idx[0][keep[0]]
        flat = idx.flatten() if keep is None else idx[keep]
        counts = torch.bincount(flat, minlength=self.num_experts)
        order = torch.argsort(counts, descending=True, stable=True)
        return order[: int((counts > 0).sum())]
