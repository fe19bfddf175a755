"""The Prefetcher against providers that record prefetch(): right layers, right ids, chained observers, uninstall."""

from __future__ import annotations

import torch

from marserve.attention import AttentionMetadata
from marserve.experts.prefetcher import Prefetcher
from marserve.experts.preferences import ExpertPreferences, LayerPreferences, LinearPredictor
from marserve.loader import load_model


def _model(baby_checkpoint, num_layers=3, **kw):
    model, _ = load_model(baby_checkpoint("qwen3_moe", num_layers=num_layers, **kw))
    calls = []
    for j, b in enumerate(model.moe_blocks()):
        # A fake provider's prefetch: record (MoE position, ids); the weights stay resident for the forward.
        b.experts.prefetch = lambda ids, j=j: calls.append((j, ids.tolist()))
    return model, calls


def _forward(model, ids):
    ids = torch.tensor(ids)
    with torch.no_grad():
        return model(ids, torch.arange(len(ids)), AttentionMetadata.dense([len(ids)]))


def test_router_prefetch_asks_the_next_layers_for_their_predicted_top_k(baby_checkpoint):
    model, calls = _model(baby_checkpoint, mar=True)
    blocks = model.moe_blocks()
    pf = Prefetcher(model, None, lookahead=2, min_prob=0.0).install()
    x = torch.randn(1, 32)
    blocks[0].routing_observer(blocks[0].layer_idx, x, None, None, None)
    want = [blocks[j].router_logits(x).float().topk(2, dim=-1).indices[0].tolist() for j in (1, 2)]
    assert calls == [(1, want[0]), (2, want[1])]  # nearest first, best first
    calls.clear()
    blocks[2].routing_observer(blocks[2].layer_idx, x, None, None, None)
    assert calls == []  # the last layer has nothing ahead
    pf.uninstall()


def test_a_batch_asks_once_per_layer_most_wanted_first(baby_checkpoint):
    model, calls = _model(baby_checkpoint)
    blocks = model.moe_blocks()
    Prefetcher(model, None, lookahead=1, per_layer=1, min_prob=0.0).install()
    x = torch.randn(40, 32)
    blocks[0].routing_observer(blocks[0].layer_idx, x, None, None, None)
    top1 = blocks[1].router_logits(x).float().argmax(-1)
    counts = torch.bincount(top1, minlength=4)
    assert len(calls) == 1 and calls[0][0] == 1
    assert sorted(calls[0][1]) == sorted(set(top1.tolist()))
    assert [int(counts[e]) for e in calls[0][1]] == sorted(counts[counts > 0].tolist(), reverse=True)


def test_a_forward_pass_prefetches_every_later_layer_and_the_old_observer_still_sees_all(baby_checkpoint):
    model, calls = _model(baby_checkpoint, num_layers=4)
    seen = []
    for b in model.moe_blocks():
        b.routing_observer = lambda l, x, z, ids, w: seen.append(l)
    pf = Prefetcher(model, None, lookahead=2, min_prob=0.0).install()
    before = _forward(model, [5, 9, 11, 40])
    assert seen == [0, 1, 2, 3]
    assert sorted({j for j, _ in calls}) == [1, 2, 3]
    assert [j for j, _ in calls] == [1, 2, 2, 3, 3]  # layer l asks l+1 then l+2
    pf.uninstall()
    assert all(b.routing_observer is not None and b.routing_observer.__name__ == "<lambda>"
               for b in model.moe_blocks())  # the recorder is back, alone
    calls.clear()
    assert torch.equal(_forward(model, [5, 9, 11, 40]), before)  # outputs never change
    assert calls == []


def test_uninstall_under_a_later_observer_leaves_a_pass_through(baby_checkpoint):
    model, calls = _model(baby_checkpoint)
    pf = Prefetcher(model, None, lookahead=1, min_prob=0.0).install()
    later = []
    for b in model.moe_blocks():
        inner = b.routing_observer
        b.routing_observer = lambda l, x, z, i, w, inner=inner: (later.append(l), inner(l, x, z, i, w))
    pf.uninstall()
    _forward(model, [1, 2, 3])
    assert later == [0, 1, 2] and calls == []


def _learned(model, sure: int):
    """Preferences whose predictors are certain of expert `sure` (and of nothing else) for every target."""
    E, H = 4, 32
    bias = torch.full((E,), -6.0)
    bias[sure] = 6.0
    lin = LinearPredictor(torch.zeros(E, H), bias)
    layers = {b.layer_idx: LayerPreferences(torch.full((E,), 0.25), None, {1: lin, 2: lin}) for b in model.moe_blocks()}
    return ExpertPreferences(layers, {1: lin, 2: lin})


def test_learned_predictor_keeps_only_confident_experts(baby_checkpoint):
    model, calls = _model(baby_checkpoint)
    blocks = model.moe_blocks()
    Prefetcher(model, _learned(model, sure=3), lookahead=1).install()  # default min_prob 0.5
    blocks[1].routing_observer(blocks[1].layer_idx, torch.randn(2, 32), None, None, None)
    assert calls == [(2, [3])]  # top-2 asked, the second below 0.5 dropped


def test_before_step_predicts_the_first_layers_from_the_steps_tokens(baby_checkpoint):
    model, calls = _model(baby_checkpoint)
    pf = Prefetcher(model, _learned(model, sure=2), lookahead=2, min_prob=0.0)
    seen = []
    pf.predictor.scores = lambda i, x, real=pf.predictor.scores: (seen.append(x.shape[0]), real(i, x))[1]
    pf.before_step([[4, 5, 6], [7, 8, 9, 10]], [True, False])  # 3 prompt tokens + the decoding one's last token
    assert seen == [4]
    assert [j for j, _ in calls] == [0, 1] and all(ids[0] == 2 for _, ids in calls)
    calls.clear()
    Prefetcher(model, None, lookahead=2).before_step([[4]], [False])  # the router cannot see before layer 0
    assert calls == []


def test_prefetching_during_engine_decode_leaves_greedy_output_unchanged(baby_checkpoint):
    from marserve.llm import LLM
    from marserve.sampling_params import SamplingParams
    llm = LLM(str(baby_checkpoint("qwen3_moe", num_layers=3, mar=True)), dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=8)
    plain = llm.generate(["the fox jumps"], params)[0].outputs[0].token_ids
    calls = []
    for j, b in enumerate(llm.model.moe_blocks()):
        b.experts.prefetch = lambda ids, j=j: calls.append(j)
    pf = Prefetcher(llm.model, None, lookahead=1, min_prob=0.0).install()
    again = llm.generate(["the fox jumps"], params)[0].outputs[0].token_ids
    pf.uninstall()
    assert again == plain
    # One pass per generated token (prefill, then decode steps on the per-layer CPU path), each asking layers 1, 2.
    assert calls.count(1) == len(again) and calls.count(2) == len(again) and 0 not in calls


def test_max_per_layer_keeps_the_experts_most_tokens_want(baby_checkpoint):
    model, calls = _model(baby_checkpoint)
    blocks = model.moe_blocks()
    Prefetcher(model, None, lookahead=1, per_layer=2, min_prob=0.0, max_per_layer=1).install()
    x = torch.randn(40, 32)
    blocks[0].routing_observer(blocks[0].layer_idx, x, None, None, None)
    counts = torch.bincount(blocks[1].router_logits(x).float().topk(2, dim=-1).indices.flatten(), minlength=4)
    assert calls == [(1, [int(counts.argmax())])]


def test_slow_reads_raise_the_probability_a_guess_needs(baby_checkpoint):
    # a wrong guess costs a whole read, a right one hides at most the compute until its layer: p > read/(read+lead)
    model, calls = _model(baby_checkpoint)
    blocks = model.moe_blocks()
    pf = Prefetcher(model, None, lookahead=2, min_prob=0.5).install()
    assert pf.min_prob_for(0, 1) == 0.5  # nothing read yet, no layer timed: the floor
    for b in blocks:
        b.experts.wrong_guess_seconds = lambda: 0.008  # 8 ms a wasted read costs
    pf.layer_seconds = 0.002  # 2 ms a layer
    assert abs(pf.min_prob_for(0, 1) - 0.8) < 1e-9  # one layer ahead: 8 / (8 + 2)
    assert abs(pf.min_prob_for(0, 2) - 8 / 12) < 1e-9  # two ahead: more time to hide the read
    assert abs(pf.min_prob_for(-1, 0) - 0.8) < 1e-9  # from the embeddings, layer 0 is one ahead
    pf.layer_seconds = 0.020  # reads shorter than the compute: the floor rules
    assert pf.min_prob_for(0, 1) == 0.5
    fixed = Prefetcher(model, None, lookahead=2, min_prob=0.9, adaptive=False)
    fixed.layer_seconds = 0.002
    assert fixed.min_prob_for(0, 1) == fixed.min_prob_for(0, 2) == 0.9  # the same threshold at every distance
    # and the guesses kept follow: a router guess below 0.8 one layer ahead is dropped when reads are slow
    x = torch.randn(1, 32)
    probs = blocks[1].router_logits(x).float().softmax(-1)[0]
    for layer_seconds, floor in ((0.020, 0.5), (0.002, 0.8)):
        calls.clear()
        pf.layer_seconds = layer_seconds
        pf.on_routing(blocks[0].layer_idx, x)
        want = [e for e in probs.topk(2).indices.tolist() if probs[e] >= floor]
        assert [ids for j, ids in calls if j == 1] == ([want] if want else [])


def test_a_layers_time_leaves_out_its_stall(baby_checkpoint, monkeypatch):
    # timing stalls as compute would make slow reads look like long layers, which would ask for more reads
    from marserve.experts import prefetcher as module
    model, _ = _model(baby_checkpoint)
    blocks = model.moe_blocks()
    pf = Prefetcher(model, None, lookahead=1).install()
    clock = iter([10.0, 10.5, 11.0])
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))
    pf._time_layer(0)
    blocks[0].experts.stats.stall_seconds += 0.4  # layer 0 waited 0.4 s of its 0.5 s for reads
    pf._time_layer(1)
    assert abs(pf.layer_seconds - 0.1) < 1e-9
    pf._time_layer(0)  # a new pass: no interval across passes
    assert abs(pf.layer_seconds - 0.1) < 1e-9


def _lookup_model(baby_checkpoint, in_flight):
    """A 3-layer model whose providers record prefetch() and expect(); reads_in_flight() returns in_flight[0]."""
    model, calls = _model(baby_checkpoint)
    expected = []
    for j, b in enumerate(model.moe_blocks()):
        b.experts.expect = lambda uses, j=j: expected.append((j, uses))
        b.experts.reads_in_flight = lambda: in_flight[0]
    return model, calls, expected


def _step(pf, model, position, tokens, route, key="s"):
    """One pass of sequence `key` from `position` (several tokens: a prefill), every layer routed by route(token)."""
    pf.before_step([tokens], [len(tokens) > 1], [key], [position])
    x = torch.zeros(len(tokens), 32)
    for i, b in enumerate(model.moe_blocks()):
        b.routing_observer(b.layer_idx, x, None, torch.tensor([route(t)[i] for t in tokens]), None)


def test_a_repeating_sequence_is_forecast_to_every_provider_and_reads_follow_once_it_proves_right(baby_checkpoint):
    in_flight = [0]
    model, calls, expected = _lookup_model(baby_checkpoint, in_flight)
    pf = Prefetcher(model, None, lookahead=1, min_prob=0.0, lookup_horizon=3).install()
    route = lambda t: [[t % 4, (t + 1) % 4], [(t + 2) % 4, (t + 3) % 4], [t % 4, (t + 2) % 4]]  # noqa: E731
    _step(pf, model, 0, [1, 2, 3], route)
    loop = [1, 2, 3] * 12
    assert expected == []  # nothing forecast yet: nothing to withdraw either
    position = 3
    for t in loop[:2]:  # (3,1) is new; (1,2) matches the prompt: the first forecast, not proven yet
        calls.clear()
        _step(pf, model, position, [t], route)
        position += 1
    assert calls and all(j != 0 for j, _ in calls)  # the router's guesses (layers 1, 2), no forecast read
    assert pf.lookup.precision() == 1.0  # that pass routed as forecast
    _step(pf, model, position, [loop[2]], route)
    position += 1
    last = dict(expected[-3:])
    assert set(last) == {0, 1, 2}
    # input 3 at position 5 after (2,3), which ended at 2: positions 2, 3, 4 (tokens 3, 1, 2) forecast this pass
    # and the next two, fetches 1-3, 4-6 and 7-9; layer 0 routes t to [t % 4, (t + 1) % 4]
    assert last[0] == {3: [1, 7], 0: [1], 1: [4], 2: [4, 7]}
    for t in loop[3:12]:  # proven right: reads follow the forecast, the router's guesses stop
        calls.clear()
        _step(pf, model, position, [t], route)
        position += 1
    # the last pass (input 3): reads start before it, with its layer 0's experts, in the order of use
    assert calls[:4] == [(0, [0]), (0, [3]), (1, [1]), (1, [2])]
    assert all(len(ids) == 1 for _, ids in calls)  # forecast reads, one at a time; the router's pairs have stopped
    calls.clear()
    in_flight[0] = Prefetcher.FORECAST_DEPTH  # the disk is busy: no forecast read starts
    _step(pf, model, position, [loop[12]], route)
    assert calls == []
    _step(pf, model, position + 1, [9], route)  # (t, 9) never seen: the forecast is withdrawn everywhere
    assert [uses for _, uses in expected[-3:]] == [{}, {}, {}]
