"""The replay's offline bound (marserve/bench/expert_bound.py): Belady's MIN on hand-made traces, checked by hand and
against an exhaustive search over every eviction choice; the time floor.

Same toy units as test_expert_replay.py: one transfer takes exactly 1 s, each attention or MoE part its launch
overhead."""

import numpy as np
import pytest

from marserve.bench.expert_bound import BeladyPolicy, time_floor_s
from marserve.bench.expert_replay import ReplayConfig, replay
from marserve.errors import ConfigError
from tests.bench.test_expert_replay import hardware, ids_of, toy

def test_belady_by_hand_beats_lru():
    # One pool of 2 slots for 4 experts (per-layer pools, budget 0.5), experts 0 and 1 resident at start.
    # Trace 2 0 2 1 2 0:
    #   MIN: 2 miss (evicts 1: never used before 0), 0 hit, 2 hit, 1 miss (evicts 0: used after 2), 2 hit,
    #        0 miss -> 3 misses
    #   lru: 2 miss (evicts 0), 0 miss (evicts 1), 2 hit, 1 miss (evicts 0), 2 hit, 0 miss -> 4 misses
    trace = ids_of(2, 0, 2, 1, 2, 0)
    served, hw = toy(1, 4, 1), hardware(0.0)
    best = replay(trace, served, ReplayConfig(0.5, "belady", per_layer=True), hw)
    lru = replay(trace, served, ReplayConfig(0.5, "lru", per_layer=True), hw)
    assert (best.hits, best.misses) == (3, 3)
    assert (lru.hits, lru.misses) == (2, 4)
    assert best.time_s == pytest.approx(3.0)  # no compute: on demand, three 1 s transfers

def test_belady_in_the_shared_pool_by_hand():
    # 2 layers x 2 experts, top-1, one shared pool of 2 slots; no prior: (layer 0, expert 0) and (1, 0) at start.
    # Tokens route (layer 0, layer 1): (1, 0), (0, 1), (1, 0).
    #   t0 L0 (0,1) miss: (0,0) next at t1 L0, (1,0) next at t0 L1 -> evicts (0,0); t0 L1 (1,0) hit;
    #   t1 L0 (0,0) miss: (1,0) next at t2 L1, (0,1) at t2 L0 -> evicts (1,0);
    #   t1 L1 (1,1) miss: (0,0) never again -> evicts it; t2 L0 (0,1) hit; t2 L1 (1,0) miss -> 4 misses, 2 hits
    ids = np.array([[[1], [0]], [[0], [1]], [[1], [0]]], dtype=np.int16)
    r = replay(ids, toy(2, 2, 1), ReplayConfig(0.5, "belady"), hardware(0.0))
    assert (r.capacity, r.hits, r.misses) == (2, 2, 4)

def _fewest_misses(keys: list, resident: frozenset, capacity: int) -> int:
    """Exhaustive search: the fewest misses of any eviction choice serving `keys` in order (one key per step)."""
    if not keys:
        return 0
    key, rest = keys[0], keys[1:]
    if key in resident:
        return _fewest_misses(rest, resident, capacity)
    if len(resident) < capacity:
        return 1 + _fewest_misses(rest, resident | {key}, capacity)
    return 1 + min(_fewest_misses(rest, (resident - {v}) | {key}, capacity) for v in resident)

def test_belady_is_optimal_against_every_eviction_choice():
    # 2 layers x 3 experts, top-1, a shared pool of 3 slots: small enough to try every eviction on 7 tokens.
    rng = np.random.default_rng(0)
    served = toy(2, 3, 1)
    for _ in range(12):
        ids = rng.integers(0, 3, size=(7, 2, 1)).astype(np.int16)
        r = replay(ids, served, ReplayConfig(0.5, "belady"), hardware(0.0))
        start = frozenset(BeladyPolicy(ids).by_preference([(l, e) for l in range(2) for e in range(3)])[:3])
        keys = [(l, int(ids[t, l, 0])) for t in range(7) for l in range(2)]
        assert r.capacity == 3
        assert r.misses == _fewest_misses(keys, start, 3)
        for policy in ("lru", "lfu", "mar"):
            assert r.misses <= replay(ids, served, ReplayConfig(0.5, policy), hardware(0.0)).misses

def test_time_floor_is_the_larger_of_compute_and_link():
    assert time_floor_s(compute_s=10.0, transfers=3, transfer_s=2.0) == 10.0
    assert time_floor_s(compute_s=1.0, transfers=3, transfer_s=2.0) == 6.0

def test_belady_takes_no_prefetch():
    with pytest.raises(ConfigError, match="prefetch"):
        ReplayConfig(0.5, "belady", prefetch=True)


def test_store_fetches_group_a_pass_and_min_on_them_is_optimal():
    from marserve.bench.expert_bound import BeladyPolicy, demand_reads, store_fetches
    from marserve.experts.policies import make_policy
    # a prefill of 2 tokens is one pass: one fetch per layer naming both tokens' experts, first use first
    ids = np.array([[[1, 0]], [[2, 1]], [[0, 2]]], dtype=np.int16)  # [T=3, L=1, K=2]
    assert store_fetches(ids, np.array([0, 0, 1]), [5]) == [(5, {1: 2, 0: 1, 2: 1}), (5, {0: 1, 2: 1})]
    # top-1 fetches, 2 layers x 3 experts, 3 slots: MIN counted on fetches equals the exhaustive search, and no
    # policy reads fewer
    rng = np.random.default_rng(1)
    keys = [(l, e) for l in range(2) for e in range(3)]
    for _ in range(12):
        ids = rng.integers(0, 3, size=(7, 2, 1)).astype(np.int16)
        fetches = store_fetches(ids, np.arange(7), [0, 1])
        best = demand_reads(fetches, BeladyPolicy.over_fetches(fetches), 3, keys)
        start = frozenset(BeladyPolicy.over_fetches(fetches).by_preference(keys)[:3])
        assert best == _fewest_misses([(l, next(iter(c))) for l, c in fetches], start, 3)
        for name in ("lru", "lfu", "mar"):
            assert best <= demand_reads(fetches, make_policy(name, 2), 3, keys)
        assert demand_reads(fetches, BeladyPolicy.over_fetches(fetches), 3, keys, counted_from=len(fetches)) == 0


def test_min_on_store_fetches_keeps_an_expert_the_same_fetch_still_needs():
    from marserve.bench.expert_bound import BeladyPolicy, demand_reads
    # 2 slots holding experts 0 and 1; the first fetch names 2 (a miss) then 0, the second 1. MIN evicts 1 for 2 (0
    # is needed in this very fetch), then reads 1 again: 2 reads. Evicting 0, whose next use only looks "after this
    # tick", would read it back at once: 3.
    fetches = [(0, {2: 1, 0: 1}), (0, {1: 1})]
    keys = [(0, e) for e in range(3)]
    assert demand_reads(fetches, BeladyPolicy.over_fetches(fetches), 2, keys) == 2
