"""The lookahead predictors: the learned fit recovers a planted rule; both score the layers they say they predict."""

from __future__ import annotations

import torch

from marserve.experts.predictors import LearnedLookahead, RouterLookahead, fit_linear, make_predictor
from marserve.experts.preferences import EMBED, ExpertPreferences, LayerPreferences, LinearPredictor
from marserve.loader import load_model


def _top_k_precision(scores, ids, k):
    pred = scores.topk(k, dim=-1).indices
    return float((pred[:, :, None] == ids[:, None, :]).any(-1).float().mean())


def test_fit_recovers_a_planted_linear_rule():
    g = torch.Generator().manual_seed(0)
    H, E, K = 24, 6, 2
    w_true = torch.randn(E, H, generator=g)
    x = torch.randn(4000, H, generator=g)
    ids = (x @ w_true.t()).topk(K, dim=-1).indices
    fitted = fit_linear(x, ids, E)
    x_new = torch.randn(2000, H, generator=g)
    ids_new = (x_new @ w_true.t()).topk(K, dim=-1).indices
    assert _top_k_precision(fitted(x_new), ids_new, K) > 0.9
    # Chance is K/E = 0.33: the fit, not luck, does it.
    assert _top_k_precision(torch.randn(2000, E, generator=g), ids_new, K) < 0.5


def _blocks(baby_checkpoint, **kw):
    model, _ = load_model(baby_checkpoint("qwen3_moe", num_layers=4, **kw))
    return model, model.moe_blocks()


def test_router_lookahead_is_the_later_layers_router_on_this_input(baby_checkpoint):
    model, blocks = _blocks(baby_checkpoint, mar=True)
    p = RouterLookahead(blocks, lookahead=2)
    assert p.targets(0) == [1, 2] and p.targets(2) == [3] and p.targets(3) == [] and p.targets(EMBED) == []
    x = torch.randn(5, 32)
    s = p.scores(1, x)
    assert s.shape == (2, 5, 4)
    assert torch.allclose(s[0], blocks[2].router_logits(x).float())  # MAR affinity included
    assert torch.allclose(s[1], blocks[3].router_logits(x).float())


def test_learned_lookahead_stacks_the_maps_of_each_source(baby_checkpoint):
    model, blocks = _blocks(baby_checkpoint)
    g = torch.Generator().manual_seed(1)
    lin = lambda: LinearPredictor(torch.randn(4, 32, generator=g), torch.randn(4, generator=g))  # noqa: E731
    layers = {b.layer_idx: LayerPreferences(torch.full((4,), 0.25), None, {1: lin(), 2: lin()}) for b in blocks}
    prefs = ExpertPreferences(layers, {1: lin()})
    p = make_predictor("auto", blocks, prefs, lookahead=2)
    assert isinstance(p, LearnedLookahead)
    assert p.targets(EMBED) == [0] and p.targets(1) == [2, 3] and p.targets(3) == []
    x = torch.randn(3, 32)
    s = p.scores(1, x)
    assert torch.allclose(s[0], prefs.predictor(1, 1)(x), atol=1e-5)
    assert torch.allclose(s[1], prefs.predictor(1, 2)(x), atol=1e-5)
    assert torch.allclose(p.scores(EMBED, x)[0], prefs.predictor(EMBED, 1)(x), atol=1e-5)
    # Without predictors "auto" falls back to the router lookahead.
    assert isinstance(make_predictor("auto", blocks, None, 1), RouterLookahead)
