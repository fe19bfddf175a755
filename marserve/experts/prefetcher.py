"""The prefetcher: on each MoE layer's routing, predicts the experts of the next layers and asks their providers for them.

It sits on each SparseMoeBlock's `routing_observer` (called before the block fetches its experts, also on the
per-layer CPU decode path), chaining any observer already there. On MoE position i it scores positions
i+1..i+lookahead with the predictor (predictors.py: learned maps when calibrated, else the router lookahead), keeps
each token's top `per_layer` experts (only those the predictor is sure enough of: at least `min_prob`, and more
where reads are slow against the compute a prefetch can hide behind, see `min_prob_for`), and calls
`model.moe_blocks()[j].experts.prefetch(ids)`, nearest layer first, the experts most tokens want first. The
provider reads them on background threads; a wrong guess costs a read, never an output (fetch() still reads
what is missing).

`before_step` (called by the engine before each forward pass) covers the first `lookahead` MoE layers, which no
earlier layer can predict: from the tokens of the step through the embedding predictor. At prefill those are
all the prompt's tokens, so the prefetch is the prompt's predicted working set of those layers; the deeper layers'
working sets follow layer by layer as the pass reaches them.

With the engine's sequence keys and chunk positions, `before_step` also asks the routing lookup (lookup.py) for a
forecast of this and the next decode steps, hands it to every provider (`expect`: eviction follows it), and once
the forecast has proven right (precision >= FORECAST_MIN_PRECISION) reads its experts in the order of use, keeping
FORECAST_DEPTH reads under way at each layer's routing, in place of the predictor's guesses for that pass.

Cost: a handful of tensor ops per layer for the whole batch (no Python loop over tokens); measured per decode
step in docs/offload.md ("Prediction").
Legend: T=tokens of the pass, E=experts, n=experts predicted per token, D'=layers predicted from one layer.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque

import torch

from marserve.experts.lookup import RoutingLookup, forecast_uses
from marserve.experts.predictors import make_predictor
from marserve.experts.preferences import EMBED, ExpertPreferences


def top_predictions(scores: torch.Tensor, n: int, min_prob: float, learned: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prefetcher's rule, in one place (bench/prediction.py measures it): scores [...,E] -> each row's top `n`
    ids [...,n], best first, and which of them reach min_prob [...,n] (None when min_prob is 0: all count).
    min_prob is compared in score space: a learned score is a logistic regression's logit, compared with
    logit(min_prob); a router's is compared after log-softmax with log(min_prob)."""
    if min_prob <= 0.0:
        return scores.topk(n, dim=-1)[1], None
    if learned:
        threshold = math.log(min_prob / (1.0 - min_prob))
    else:
        scores = scores - torch.logsumexp(scores, dim=-1, keepdim=True)
        threshold = math.log(min_prob)
    top, idx = scores.topk(n, dim=-1)
    return idx, top >= threshold


class Prefetcher:
    FORECAST_DEPTH = 2  # forecast reads kept under way at once
    FORECAST_MIN_PRECISION = 0.9  # reads follow the lookup's forecast only while it is right this often

    def __init__(self, model, preferences: ExpertPreferences | None, lookahead: int = 1, per_layer: int | None = None,
                 min_prob: float = 0.5, predictor: str = "auto", max_per_layer: int | None = None,
                 adaptive: bool = True, lookup_horizon: int = 4):
        """lookahead: how many MoE layers ahead to prefetch (a slow read needs more than one layer's compute to
        hide); per_layer: experts predicted per token and layer (default: the model's top-k); min_prob: keep only
        predictions the predictor gives at least this probability (sigmoid of a learned score, softmax of router
        logits); predictor: "auto", "learned" or "router"; max_per_layer: at most this many experts per layer and
        call, the ones most tokens want (a batch's union can outgrow a small expert cache and evict itself);
        adaptive: raise the threshold where reads are slow against the compute they can hide behind
        (min_prob_for); False: min_prob at every distance (`bench experts --live-prefetch-min-prob`);
        lookup_horizon: decode steps the routing lookup forecasts, for eviction and, once proven, reads (lookup.py;
        0: no lookup). The
        defaults (1 layer ahead, top-k, p >= 0.5) are the setting with the best recall at a precision >= 0.9 on the
        default model (docs/offload.md, "Prediction")."""
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
        self.adaptive = adaptive
        self.max_per_layer = max_per_layer
        self.num_experts = num_experts
        self._position = {b.layer_idx: i for i, b in enumerate(self.blocks)}
        self.layer_seconds = 0.0  # moving average of one MoE layer's compute: routing i to routing i+1, less stall
        self._last_routing: tuple[int, float, float] | None = None  # (MoE position, when, its stall seconds then)
        self._chained: list = []  # per MoE position: the observer that was there before install()
        self._observers: list = []
        self.num_prefetched = 0  # expert ids handed to providers (before they drop resident ones)
        self.lookup = RoutingLookup(len(self.blocks), self.blocks[0].top_k, lookup_horizon) if lookup_horizon else None
        self._expecting = False  # a forecast was handed to the providers and not withdrawn
        self._to_read: deque[tuple[int, int, int]] = deque()  # forecast uses not read yet: (fetch, position, expert)
        self._reading_forecast = False  # this pass reads from the forecast (instead of the predictor's guesses)
        self.num_forecast_passes = 0  # passes whose reads followed the forecast

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
                self.on_routing(layer_idx, router_input, topk_ids)
        observer.active = True
        return observer

    # -- prediction -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_routing(self, layer_idx: int, router_input: torch.Tensor, topk_ids: torch.Tensor | None = None) -> None:
        """Layer layer_idx routed x [T,H] to topk_ids [T,K]: prefetch the predicted experts of the next `lookahead`
        MoE layers (and let the lookup remember the routing)."""
        i = self._position[layer_idx]
        self._time_layer(i)
        if self.lookup is not None and topk_ids is not None:
            self.lookup.record(i, topk_ids.cpu().numpy())
        if self._to_read:
            self._read_forecast(i + 1)
        targets = self.predictor.targets(i)
        if targets and not self._reading_forecast:  # the forecast covers every layer, and is surer
            self._prefetch(i, targets, self.predictor.scores(i, router_input))

    @torch.no_grad()
    def before_step(self, input_ids_per_sequence: list[list[int]], is_prefill: list[bool],
                    seq_keys: list | None = None, start_pos: list[int] | None = None) -> None:
        """Before the forward pass: predict the first MoE layers' experts from the step's tokens (a prefilling
        sequence contributes all its ids, a decoding one its last id); with seq_keys (a key per sequence, stable
        across steps) and start_pos (where each chunk starts in its sequence), input_ids_per_sequence holds each
        chunk's tokens, and the routing lookup forecasts the coming steps (_forecast)."""
        if self.lookup is not None and seq_keys is not None and start_pos is not None:
            self._forecast(seq_keys, input_ids_per_sequence, start_pos, is_prefill)
        targets = self.predictor.targets(EMBED)
        if not targets or not input_ids_per_sequence:
            return
        ids = list(itertools.chain.from_iterable(
            seq if prefill else seq[-1:] for seq, prefill in zip(input_ids_per_sequence, is_prefill)))
        if not ids:
            return
        embed = self.model.model.embed_tokens
        x = embed(torch.tensor(ids, device=embed.weight.device))  # [T,H]
        self._prefetch(EMBED, targets, self.predictor.scores(EMBED, x))

    def _forecast(self, seq_keys: list, chunks: list[list[int]], start_pos: list[int], is_prefill: list[bool]
                  ) -> None:
        """Hand each layer's provider the lookup's forecast for this and the next steps (or withdraw the last)."""
        found = self.lookup.begin_pass(seq_keys, chunks, start_pos, is_prefill)
        if found is None and not self._expecting:
            return
        uses = forecast_uses(found, len(self.blocks)) if found is not None else [{}] * len(self.blocks)
        for block, layer_uses in zip(self.blocks, uses):
            block.experts.expect(layer_uses)
        self._expecting = found is not None
        self._reading_forecast = found is not None and self.lookup.precision() >= self.FORECAST_MIN_PRECISION
        self.num_forecast_passes += self._reading_forecast
        self._to_read = deque(sorted((at[0], i, e) for i, layer_uses in enumerate(uses) for e, at in layer_uses.items()
                                     ) if self._reading_forecast else ())
        self._read_forecast(0)

    def _read_forecast(self, now: int) -> None:
        """At fetch `now` (0: before the pass; MoE position i's fetch is i + 1): read the forecast's next uses, in
        the order they are wanted, while fewer than FORECAST_DEPTH reads are under way (the disk kept busy, each
        slot taken as late as that allows); a read the store will not start yet (its victim is wanted sooner)
        waits for a later call. Uses due at or before `now` are left to their fetch."""
        todo = self._to_read
        while todo and todo[0][0] <= now:
            todo.popleft()
        experts = self.blocks[0].experts
        while todo and experts.reads_in_flight() < self.FORECAST_DEPTH:
            at, i, e = todo[0]
            if self.blocks[i].experts.prefetch(torch.tensor([e], dtype=torch.long)):
                return
            todo.popleft()
            self.num_prefetched += 1

    def _time_layer(self, i: int) -> None:
        """Routing of MoE position i: the time since position i-1 routed in the same pass, less what i-1 waited for
        its reads (counting stalls in would make slow reads look like long layers, and ask for more reads)."""
        now, stall = time.perf_counter(), self.blocks[i].experts.stats.stall_seconds
        last = self._last_routing
        if last is not None and last[0] == i - 1:
            took = now - last[1] - (self.blocks[i - 1].experts.stats.stall_seconds - last[2])
            if took > 0.0:
                self.layer_seconds += (took - self.layer_seconds) / 16 if self.layer_seconds else took
        self._last_routing = (i, now, stall)

    def min_prob_for(self, source: int, target: int) -> float:
        """The probability a prediction of MoE position `target`, made at position `source`, needs to be worth a
        read: min_prob, or more where reads are slow against the compute they can hide behind. A right guess
        hides at most the compute until the target layer runs (lead: one MoE layer's time per layer ahead) of
        a read that would happen anyway; a wrong one costs a read that later reads queue behind, as often as
        reads are in flight (the provider's wrong_guess_seconds). So a guess with probability p pays when
        p x lead > (1 - p) x cost: p > cost / (cost + lead). Reads as fast as a layer's compute (the default
        model) leave min_prob; a disk busy with 9.4 MB reads against ~2 ms layers asks for ~0.75-0.8 one layer
        ahead (docs/offload.md, "Slow reads ask for surer guesses")."""
        if not self.adaptive:
            return self.min_prob
        read = self.blocks[target].experts.wrong_guess_seconds()
        lead = (target - source) * self.layer_seconds
        if read <= 0.0 or lead <= 0.0:
            return self.min_prob
        return max(self.min_prob, read / (read + lead))

    def _prefetch(self, source: int, targets: list[int], scores: torch.Tensor) -> None:
        """scores [D',T,E] of MoE positions `targets`, predicted at position `source` -> one prefetch() per
        position, nearest first."""
        learned = self.predictor.name == "learned"
        for d, j in enumerate(targets):
            idx, keep = top_predictions(scores[d], self.per_layer, self.min_prob_for(source, j), learned)  # [T,n]
            if scores.shape[1] == 1:  # one token (batch-1 decode): a few numbers, cheaper as Python lists
                ids = idx[0].tolist() if keep is None else [e for k, e in zip(keep[0].tolist(), idx[0].tolist()) if k]
                ids = torch.tensor(ids, dtype=torch.long)
            else:
                ids = self._ranked_union(idx, keep)
            if ids.numel():
                self.num_prefetched += ids.numel()
                self.blocks[j].experts.prefetch(ids)

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This prefetcher's settings applied to scores [D',T,E] (see top_predictions)."""
        return top_predictions(scores, self.per_layer, self.min_prob, self.predictor.name == "learned")

    def _ranked_union(self, idx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """idx [T,n] predicted ids (keep [T,n] which count) -> the distinct ids, wanted by most tokens first."""
        flat = idx.flatten() if keep is None else idx[keep]
        counts = torch.bincount(flat, minlength=self.num_experts)
        order = torch.argsort(counts, descending=True, stable=True)
        n = int((counts > 0).sum())
        return order[: n if self.max_per_layer is None else min(n, self.max_per_layer)]
