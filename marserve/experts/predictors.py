"""Guessing which experts the next MoE layers will pick, from the current layer's router input (or the token embedding).

Two predictors with one interface, `scores(i, x) -> [D', T, E]` for MoE positions i+1..i+D' (i = position of the
current MoE layer in `model.moe_blocks()`; i = -1 means "from the token embeddings", before layer 0):

* `RouterLookahead`: MoE layer j's own router (gate, plus MAR affinity where the layer has memory) evaluated on
  layer i's router input. Free (no calibration), and on MAR layers the affinity term carries over well, because
  the residual stream changes little between neighbouring layers.
* `LearnedLookahead`: per (layer, distance) a linear map H -> E fitted on routing traces (`fit_linear`): least
  squares to start, then a few hundred full-batch steps of logistic regression on "was expert e in the top-k".
  The idea is that of the pre-attention predictors of arXiv 2511.10676, in its simplest form.

Legend: T=tokens, E=experts, K=experts per token, H=hidden, D=lookahead distance (in MoE layers), N=trace tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from marserve.experts.preferences import EMBED, ExpertPreferences, LinearPredictor


class RouterLookahead:
    """Scores of MoE layer i+d = that layer's router logits on layer i's router input."""

    name = "router"

    def __init__(self, blocks, lookahead: int):
        self.blocks = list(blocks)
        self.lookahead = lookahead

    def targets(self, i: int) -> list[int]:
        """MoE positions predicted from position i (embedding: none; its router input does not exist yet)."""
        if i == EMBED:
            return []
        return list(range(i + 1, min(i + 1 + self.lookahead, len(self.blocks))))

    def scores(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x [T,H] router input of MoE position i -> [D',T,E] float scores of positions targets(i)."""
        return torch.stack([self.blocks[j].router_logits(x).float() for j in self.targets(i)]) \
            if self.targets(i) else x.new_zeros(0, x.shape[0], self.blocks[0].experts.num_experts, dtype=torch.float32)


class LearnedLookahead:
    """Scores of MoE layer i+d = the calibrated linear map (layer i, distance d) of layer i's router input.

    The maps of one source layer are stacked into one [D'*E, H] matrix: one product per layer at run time."""

    name = "learned"

    def __init__(self, blocks, preferences: ExpertPreferences, lookahead: int):
        self.blocks = list(blocks)
        self.lookahead = lookahead
        self._stacked: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        for i in [EMBED] + list(range(len(self.blocks))):
            src = EMBED if i == EMBED else self.blocks[i].layer_idx
            ds = [d for d in range(1, lookahead + 1) if i + d < len(self.blocks)
                  and preferences.predictor(src, d) is not None]
            if ds:
                lins = [preferences.predictor(src, d) for d in ds]
                device = _device_of(self.blocks[0])
                self._stacked[i] = ([i + d for d in ds], torch.cat([p.weight for p in lins]).float().to(device),
                                    torch.cat([p.bias for p in lins]).float().to(device))

    def targets(self, i: int) -> list[int]:
        found = self._stacked.get(i)
        return found[0] if found else []

    def scores(self, i: int, x: torch.Tensor) -> torch.Tensor:
        targets, w, b = self._stacked.get(i, ([], None, None))
        E = self.blocks[0].experts.num_experts
        if not targets:
            return x.new_zeros(0, x.shape[0], E, dtype=torch.float32)
        return torch.addmm(b, x.float(), w.t()).view(x.shape[0], len(targets), E).transpose(0, 1)


def _device_of(block) -> torch.device:
    """Where the block computes (its router's parameters; a oneDNN-packed gate reports cpu too)."""
    return next(block.parameters()).device


def make_predictor(kind: str, blocks, preferences: ExpertPreferences | None, lookahead: int):
    """"router", "learned", or "auto" (learned when the preferences carry predictors: it measures better, see
    docs/offload.md "Prediction"; else router)."""
    if kind == "auto":
        kind = "learned" if preferences is not None and preferences.has_predictors else "router"
    if kind == "router":
        return RouterLookahead(blocks, lookahead)
    if kind == "learned":
        if preferences is None or not preferences.has_predictors:
            raise ValueError("the learned predictor needs preferences with predictors: run `marserve calibrate`")
        return LearnedLookahead(blocks, preferences, lookahead)
    raise ValueError(f"unknown predictor {kind!r}; use 'auto', 'router' or 'learned'")


def multi_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [N,K] -> [N,E] float with 1 where the expert was picked."""
    return torch.zeros(ids.shape[0], num_experts).scatter_(1, ids.long(), 1.0)


@torch.no_grad()
def _least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression y ~ x @ W.T + b on centred data -> (W [E,H], b [E])."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.t() @ xc
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-6))
    w = torch.linalg.solve(gram, xc.t() @ yc).t()  # [E,H]
    return w.contiguous(), my - w @ mx


def fit_linear(x: torch.Tensor, target_ids: torch.Tensor, num_experts: int, steps: int = 60,
               ridge: float = 1e-3, weight_decay: float = 1e-4) -> LinearPredictor:
    """Fit logits [N,E] = x [N,H] @ W.T + b so that the top-k of the logits are the experts in target_ids [N,K].

    Least squares on the multi-hot targets gives the start; full-batch L-BFGS on the logistic loss of each
    (token, expert) "picked or not" then sharpens the ranking (about 2 s per map for N=16k, H=256 on one core)."""
    x = x.float()
    y = multi_hot(target_ids, num_experts)
    w0, b0 = _least_squares(x, y, ridge)
    scale = x.pow(2).mean().sqrt().clamp_min(1e-6)  # keep the optimiser's problem well-scaled for any hidden size
    xs = x / scale
    w = (w0 * scale).clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(torch.addmm(b, xs, w.t()), y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearPredictor((w.detach() / scale).contiguous(), b.detach().contiguous())
