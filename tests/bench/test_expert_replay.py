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
    # capacity 2 of 4 experts, pools start empty. Trace 0 0 1 2 0:
    #   lru: 0 miss, 0 hit, 1 miss, 2 miss (evicts 0, used at t=1 before 1 at t=2), 0 miss -> 1 hit, 4 misses
    #   lfu: ... 2 miss evicts 1 (1 use against 0's 2), 0 hit                          -> 2 hits, 3 misses
    trace = ids_of(0, 0, 1, 2, 0)
    lru = replay(trace, toy(1, 4, 1), ReplayConfig(0.5, "lru"), hardware(0.0))
    lfu = replay(trace, toy(1, 4, 1), ReplayConfig(0.5, "lfu"), hardware(0.0))
    assert (lru.hits, lru.misses, lru.lookups) == (1, 4, 5)
    assert (lfu.hits, lfu.misses) == (2, 3)
    # no compute: the time is the transfers, one second each
    assert lru.time_s == pytest.approx(4.0) and lru.stall_s == pytest.approx(4.0)
    assert lfu.time_s == pytest.approx(3.0) and lru.bytes_moved == 4 * 3
    assert lru.capacity == 2 and not lru.clamped
    assert lru.ms_per_token == pytest.approx(800.0)


def test_usage_prior_fills_the_cache_before_the_first_token():
    usage = np.array([[0.1, 0.6, 0.3, 0.0]])  # top-2: experts 1 and 2 resident at start
    r = replay(ids_of(1, 2, 0), toy(1, 4, 1), ReplayConfig(0.5, "lru"), hardware(0.0), usage=usage)
    assert (r.hits, r.misses) == (2, 1)


def test_prefetch_overlaps_compute_and_a_wrong_prediction_costs_link_time():
    # 2 layers, 4 experts, top-1, 1 slot per layer (budget 0.25), every attention/MoE part 1 s, transfers 1 s.
    # token 0: layer 0 needs 0, layer 1 needs 1; token 1: layer 0 needs 0, layer 1 needs 2.
    # Layer 0 predicts layer 1: right (1) on token 0, wrong (3) on token 1.
    ids = np.array([[[0], [1]], [[0], [2]]], dtype=np.int16)
    predictions = np.array([[[[1]], [[0]]], [[[3]], [[0]]]], dtype=np.int16)  # [T=2, L=2, D=1, M=1]
    served, hw = toy(2, 4, 1), hardware(1.0)
    # Without prefetch, by hand: t0/L0 attn to 1, miss until 2, MoE to 3; t0/L1 attn to 4, miss until 5, MoE
    # to 6; t1/L0 attn to 7, hit, MoE to 8; t1/L1 attn to 9, miss (2) until 10, MoE to 11.
    plain = replay(ids, served, ReplayConfig(0.25, "lru"), hw)
    assert (plain.hits, plain.misses, plain.prefetches) == (1, 3, 0)
    assert plain.time_s == pytest.approx(11.0) and plain.stall_s == pytest.approx(3.0)
    assert plain.compute_s == pytest.approx(8.0)
    # With prefetch: t0/L0 miss until 2, queues expert 1 for L1 at time 1; the link is free at 2, so it
    # arrives at 3, before L1 routes at 4 (a prefetch hit, no stall). t1/L0 hit at 7, queues 3 for L1; it
    # runs 7-8 and evicts 1; L1 routes at 9 and needs 2: a miss (evicting the useless 3), 9-10, stall 1.
    pre = replay(ids, served, ReplayConfig(0.25, "lru", prefetch=True, lookahead=1), hw, predictions=predictions)
    assert (pre.hits, pre.misses, pre.prefetches, pre.prefetch_hits) == (2, 2, 2, 1)
    assert pre.time_s == pytest.approx(10.0) and pre.stall_s == pytest.approx(2.0)
    assert pre.precision == pytest.approx(0.5) and pre.recall == pytest.approx(1 / 3)
    assert pre.bytes_moved == 4 * 3


def test_budget_below_one_tokens_experts_is_clamped():
    r = replay(ids_of(0, 1), toy(1, 8, 1), ReplayConfig(0.05, "lru"), hardware(0.0))
    assert r.capacity == 1 and r.clamped


def test_shape_mismatch_and_missing_predictions_are_config_errors():
    with pytest.raises(ConfigError, match="layers"):
        replay(ids_of(0), toy(2, 4, 1), ReplayConfig(0.5), hardware(0.0))
    with pytest.raises(ConfigError, match="predictions"):
        replay(ids_of(0), toy(1, 4, 1), ReplayConfig(0.5, prefetch=True), hardware(0.0))
    with pytest.raises(ConfigError, match="policy"):
        ReplayConfig(0.5, "fifo")
