"""The trace replay's arithmetic on hand-made traces: hit/miss counts and modelled times worked out by hand.

The toy served model has 3-byte experts and a link of 3 bytes/s, so one transfer takes exactly 1 s; weights
cost no compute and each attention or MoE part of a layer takes exactly its 1 s launch overhead (or 0).
"""

import numpy as np
import pytest

from marserve.bench.expert_replay import Hardware, ReplayConfig, ServedModel, replay
from marserve.errors import ConfigError


def toy(layers: int, experts: int, top_k: int) -> ServedModel:
    return ServedModel("toy", num_moe_layers=layers, num_experts=experts, top_k=top_k, hidden_size=1,
                       expert_intermediate=1, num_shared_experts=0, attention_params=0, lm_head_params=0,
                       bytes_per_param=1)


def hardware(overhead: float) -> Hardware:
    return Hardware(hbm_gbs=1e9, pcie_gbs=3e-9, nvme_gbs=3e-9, launch_overhead_s=overhead)


def ids_of(*rows):
    """One layer, top-1: a sequence of expert ids -> [T, 1, 1]."""
    return np.array(rows, dtype=np.int16).reshape(-1, 1, 1)


def test_lru_and_lfu_hits_by_hand():
    # One pool per layer, capacity 2 of 4 experts; with no usage prior the store's order fills it with experts
    # 0 and 1. Trace 2 2 3 0 2:
    #   lru: 2 miss (evicts 0), 2 hit, 3 miss (evicts 1), 0 miss (evicts 2, used before 3), 2 miss -> 1 hit, 4 misses
    #   lfu: ... 0 miss evicts 3 (1 use against 2's two), 2 hit                              -> 2 hits, 3 misses
    trace = ids_of(2, 2, 3, 0, 2)
    lru = replay(trace, toy(1, 4, 1), ReplayConfig(0.5, "lru", per_layer=True), hardware(0.0))
    lfu = replay(trace, toy(1, 4, 1), ReplayConfig(0.5, "lfu", per_layer=True), hardware(0.0))
    assert (lru.hits, lru.misses, lru.lookups) == (1, 4, 5)
    assert (lfu.hits, lfu.misses) == (2, 3)
    # no compute: the time is the transfers, one second each
    assert lru.time_s == pytest.approx(4.0) and lru.stall_s == pytest.approx(4.0)
    assert lfu.time_s == pytest.approx(3.0) and lru.bytes_moved == 4 * 3
    assert lru.capacity == 2 and not lru.clamped
    assert lru.ms_per_token == pytest.approx(800.0)


def test_usage_prior_fills_the_cache_before_the_first_token():
    usage = np.array([[0.1, 0.6, 0.3, 0.0]])  # top-2: experts 1 and 2 resident at start
    r = replay(ids_of(1, 2, 0), toy(1, 4, 1), ReplayConfig(0.5, "lru", per_layer=True), hardware(0.0), usage=usage)
    assert (r.hits, r.misses) == (2, 1)


def test_shared_pool_is_sized_like_the_store():
    # 2 layers x 2 experts, top-1: the minimum is max(K x L, E) = 2 slots of 4. Initial set: expert 0 of each
    # layer. Token 0 needs expert 1 in both layers: two misses (lru evicts layer 0's expert 0 first: both unused,
    # the first found), then token 1 finds both.
    ids = np.array([[[1], [1]], [[1], [1]]], dtype=np.int16)
    r = replay(ids, toy(2, 2, 1), ReplayConfig(0.5, "lru"), hardware(0.0))
    assert (r.capacity, r.clamped, r.hits, r.misses) == (2, False, 2, 2)
    clamped = replay(ids, toy(2, 2, 1), ReplayConfig(0.25, "lru"), hardware(0.0))
    assert (clamped.capacity, clamped.clamped) == (2, True)


def test_prefetch_overlaps_compute_and_a_wrong_prediction_costs_link_time():
    # 2 layers, 4 experts, top-1, 1 slot per layer (per-layer pools, budget 0.25; expert 0 resident in each at
    # start), every attention/MoE part 1 s, transfers 1 s. Token 0: layer 0 needs 0, layer 1 needs 1; token 1:
    # layer 0 needs 0, layer 1 needs 2. Layer 0 predicts layer 1: right (1) on token 0, wrong (3) on token 1.
    ids = np.array([[[0], [1]], [[0], [2]]], dtype=np.int16)
    predictions = np.array([[[[1]], [[0]]], [[[3]], [[0]]]], dtype=np.int16)  # [T=2, L=2, D=1, M=1]
    served, hw = toy(2, 4, 1), hardware(1.0)
    # Without prefetch, by hand: t0/L0 attn to 1, hit, MoE to 2; t0/L1 attn to 3, miss until 4, MoE to 5;
    # t1/L0 attn to 6, hit, MoE to 7; t1/L1 attn to 8, miss (2) until 9, MoE to 10.
    plain = replay(ids, served, ReplayConfig(0.25, "lru", per_layer=True), hw)
    assert (plain.hits, plain.misses, plain.prefetches) == (2, 2, 0)
    assert plain.time_s == pytest.approx(10.0) and plain.stall_s == pytest.approx(2.0)
    assert plain.compute_s == pytest.approx(8.0)
    # With prefetch: t0/L0 routes at 1 and queues expert 1 for layer 1; the link is free, so it runs 1-2,
    # before layer 1 routes at 3 (a prefetch hit, no stall). t1/L0 routes at 5 and queues 3; it runs 5-6 and
    # evicts 1; layer 1 routes at 7 and needs 2: a miss (evicting the useless 3), 7-8, stall 1; MoE to 9.
    pre = replay(ids, served, ReplayConfig(0.25, "lru", prefetch=True, lookahead=1, per_layer=True), hw,
                 predictions=predictions)
    assert (pre.hits, pre.misses, pre.prefetches, pre.prefetch_hits) == (3, 1, 2, 1)
    assert pre.time_s == pytest.approx(9.0) and pre.stall_s == pytest.approx(1.0)
    assert pre.precision == pytest.approx(0.5) and pre.recall == pytest.approx(0.5)
    assert pre.bytes_moved == 3 * 3


def test_shape_mismatch_and_missing_predictions_are_config_errors():
    with pytest.raises(ConfigError, match="layers"):
        replay(ids_of(0), toy(2, 4, 1), ReplayConfig(0.5), hardware(0.0))
    with pytest.raises(ConfigError, match="predictions"):
        replay(ids_of(0), toy(1, 4, 1), ReplayConfig(0.5, prefetch=True), hardware(0.0))
    with pytest.raises(ConfigError, match="policy"):
        ReplayConfig(0.5, "fifo")


def test_the_replay_tells_mar_the_layer_order(monkeypatch):
    # 3 layers x 2 experts, top-1, one shared pool of 3 slots. On this trace mar with the layer order (which layer
    # is fetched next) moves as few experts as the offline bound; told no layer, it moves more than lru. mar's
    # calibration by age is left out: 4 tokens are no evidence for it (tests/experts/test_policies.py has it).
    ids = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=np.int16)[..., None]
    served, hw = toy(3, 2, 1), hardware(0.0)
    from marserve.bench import expert_replay
    from marserve.experts.policies import MARPolicy, make_policy
    monkeypatch.setattr(expert_replay, "make_policy", lambda name, layers: MARPolicy(
        half_life=8.0 * layers, prediction_ttl=2 * layers, num_layers=layers, calibration_half_life=None)
        if name == "mar" else make_policy(name, layers))
    misses = {p: replay(ids, served, ReplayConfig(0.5, p), hw).misses for p in ("lru", "mar", "belady")}
    assert misses == {"lru": 7, "mar": 6, "belady": 6}
    advance = MARPolicy.advance
    monkeypatch.setattr(MARPolicy, "advance", lambda self, layer=None: advance(self))
    assert replay(ids, served, ReplayConfig(0.5, "mar"), hw).misses == 8
