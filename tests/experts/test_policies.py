"""The eviction policies on their own (no model): who is evicted, how the prior orders the initial set, pinning."""

import pytest

from marserve.experts.policies import NEVER_USED, POLICIES, LFUPolicy, LRUPolicy, MARPolicy, make_policy


def _use(policy, key, n=1):
    policy.advance()
    policy.on_access(key, n)


def test_lru_evicts_the_least_recently_used():
    p = LRUPolicy()
    for k in [(0, 0), (0, 1), (0, 2)]:
        p.on_insert(k)
        _use(p, k)
    _use(p, (0, 0))  # 0 is now the most recent; 1 the oldest
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)


def test_lfu_evicts_the_least_used_and_remembers_across_evictions():
    p = LFUPolicy()
    _use(p, (1, 0), 5)
    _use(p, (1, 1), 1)
    _use(p, (1, 2), 3)
    assert p.victim([(1, 0), (1, 1), (1, 2)]) == (1, 1)
    p.on_evict((1, 0))
    _use(p, (1, 1), 1)
    _use(p, (1, 2), 3)
    # (1, 0) was evicted but its 5 uses count when it comes back
    assert p.victim([(1, 0), (1, 1), (1, 2)]) == (1, 1)


def test_lfu_ties_go_to_the_least_recent():
    p = LFUPolicy()
    _use(p, (0, 3))
    _use(p, (0, 4))
    assert p.victim([(0, 4), (0, 3)]) == (0, 3)


def test_mar_prior_decides_between_cold_experts():
    p = MARPolicy()
    p.set_scores(0, [0.1, 0.6, 0.3])
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 0)
    assert p.by_preference([(0, 0), (0, 1), (0, 2)]) == [(0, 1), (0, 2), (0, 0)]


def test_mar_frequency_outweighs_the_prior_and_decays():
    p = MARPolicy(half_life=2.0, prediction_ttl=100)
    p.set_scores(0, [0.1, 0.9])
    for _ in range(4):
        _use(p, (0, 0))
    assert p.victim([(0, 0), (0, 1)]) == (0, 1)  # used 4 times lately beats a high prior
    for _ in range(40):
        p.advance()  # 20 half-lives: the history has faded
    assert p.victim([(0, 0), (0, 1)]) == (0, 0)


def test_mar_keeps_a_pending_prediction_until_used_or_stale():
    p = MARPolicy(half_life=8.0, prediction_ttl=3)
    for _ in range(5):
        _use(p, (0, 0))
    p.on_predict((0, 1))
    assert p.victim([(0, 0), (0, 1)]) == (0, 0)  # the predicted expert stays, history or not
    _use(p, (0, 1))  # used: the prediction is spent
    p.on_predict((0, 2))
    for _ in range(4):
        p.advance()  # older than the ttl
    assert p.victim([(0, 2), (0, 0)]) == (0, 2)


def test_initial_order_without_scores_spreads_layers():
    p = LRUPolicy()
    keys = [(layer, e) for layer in range(3) for e in range(4)]
    assert p.by_preference(keys)[:3] == [(0, 0), (1, 0), (2, 0)]


def test_initial_order_follows_each_layers_usage():
    p = LRUPolicy()
    p.set_scores(0, [1, 5, 2, 0])
    p.set_scores(1, [4, 1, 1, 1])
    order = p.by_preference([(layer, e) for layer in range(2) for e in range(4)])
    # normalised per layer: layer 1 expert 0 = 4 * 4 / 7 = 2.29; layer 0 expert 1 = 5 * 4 / 8 = 2.5
    assert order[:3] == [(0, 1), (1, 0), (0, 2)]


def test_only_mar_pins_and_only_with_a_prior_and_beyond_the_minimum():
    assert LRUPolicy().num_pinned(100, 10) == 0
    p = MARPolicy(pin_share=0.25)
    assert p.num_pinned(100, 10) == 0  # nothing to choose by
    p.set_scores(0, [1.0, 2.0])
    assert p.num_pinned(100, 10) == 22  # a quarter of the 90 slots beyond the minimum
    assert p.num_pinned(10, 10) == 0


def test_mar_as_the_store_makes_it_pins_nothing():
    # its calibrated estimate keeps the hot experts resident anyway; slots pinned by the prior were lost to the
    # rest (Qwen3-30B-A3B's replay at 12.5%: docs/benchmarks.md, "Expert offloading")
    p = make_policy("mar", 4)
    p.set_scores(0, [1.0, 2.0])
    assert p.num_pinned(100, 10) == 0


@pytest.mark.parametrize("name", POLICIES)
def test_make_policy(name):
    assert make_policy(name, 4).name == name


def test_unknown_policy():
    with pytest.raises(ValueError, match="lru, lfu, mar"):
        make_policy("fifo")


def _fetch(policy, layer, *experts):
    """One fetch of `layer` that uses `experts`, as the store and the replay report it."""
    policy.advance(layer)
    for e in experts:
        policy.on_access((layer, e))


def test_mar_told_the_layer_order_keeps_the_layer_fetched_next():
    # 3 layers fetched in a cycle. Token 0 uses expert 0 of every layer; token 1's fetch of layer 0 needs a slot.
    # (1, 0) was used longer ago than (2, 0), and both once: by history alone (lru, or mar without layer order)
    # (1, 0) would go, yet layer 1 is fetched next (1 tick away) and layer 2 only after it: (2, 0) goes.
    p = make_policy("mar", 3)
    for layer in range(3):
        _fetch(p, layer, 0)
    _fetch(p, 0, 1)
    assert p.victim([(1, 0), (2, 0)]) == (2, 0)
    assert p.expected_distance((1, 0)) < p.expected_distance((2, 0))
    assert LRUPolicy.victim(p, [(1, 0), (2, 0)]) == (1, 0)  # what history alone picks


def test_mar_distance_weighs_the_chance_of_use():
    # Layer 2's expert 1 is used at every fetch, layer 1's expert 2 never after its first: although layer 1 comes
    # first, its rarely used expert is expected later and goes.
    p = make_policy("mar", 3)
    for t in range(6):
        _fetch(p, 0, 0)
        _fetch(p, 1, 0, 2) if t == 0 else _fetch(p, 1, 0)
        _fetch(p, 2, 1)
    _fetch(p, 0, 0)
    assert p.use_probability((2, 1)) > 0.5 > p.use_probability((1, 2))
    assert p.victim([(1, 2), (2, 1)]) == (1, 2)


def test_mar_told_the_layer_order_still_keeps_a_pending_prediction_first():
    # (2, 1) is predicted (the prefetcher's guess about this very token) but its layer comes after layer 1, whose
    # expert 0 is used at every fetch: the prediction still outranks the estimate, as without layer order.
    p = make_policy("mar", 3)
    for _ in range(4):
        for layer in range(3):
            _fetch(p, layer, 0)
    _fetch(p, 0, 0)
    assert p.victim([(1, 0), (2, 1)]) == (2, 1)  # by expected distance alone
    p.on_predict((2, 1))
    assert p.victim([(1, 0), (2, 1)]) == (1, 0)


def _runs(calibration_half_life):
    """One layer of 8 experts whose routing comes in runs: each expert is used at 4 fetches in a row, then not for
    long (an expert of the last token is reused far more often than its average rate); then experts 6 and 7 start
    their runs, one fetch each."""
    p = MARPolicy(half_life=8.0, prediction_ttl=2, num_layers=1, calibration_half_life=calibration_half_life)
    p.set_scores(0, [1.0] * 8)
    for e in range(6):
        for _ in range(4):
            _fetch(p, 0, e)
    _fetch(p, 0, 6)
    _fetch(p, 0, 7)
    return p


def test_mar_calibrates_its_estimate_by_age():
    # Expert 4 was used 4 times, its run ending 4 fetches ago; expert 7 once, at the last fetch. By the blend of
    # decayed uses and prior alone, 4 is more likely and 7 goes; the calibration has seen that in this routing
    # an expert used at the last fetch is used again far more often than the blend says, and one whose run
    # ended a few fetches ago far less: 4 goes.
    blend = _runs(calibration_half_life=None)
    assert blend.use_probability((0, 4)) > blend.use_probability((0, 7))
    assert blend.victim([(0, 4), (0, 7)]) == (0, 7)
    p = _runs(calibration_half_life=64.0)
    assert p.calibration(0) > 2 and p.calibration(3) < 0.5  # age 1 (used at the last fetch); ages 4-5
    assert p.use_probability((0, 7)) > p.use_probability((0, 4))
    assert p.victim([(0, 4), (0, 7)]) == (0, 4)


def test_mar_calibration_counts_the_never_used_through_their_prior():
    # experts 0 and 1 are used at every fetch; 2..7, never: their group's uses per estimated use fall below 1
    p = make_policy("mar", 1)
    p.set_scores(0, [1.0] * 8)
    for _ in range(20):
        _fetch(p, 0, 0, 1)
    assert p.calibration(NEVER_USED) < 0.5 < 1.5 < p.calibration(0)
    assert p.use_probability((0, 5)) < 0.05 < 0.5 < p.use_probability((0, 0))


def test_mar_counts_a_use_for_its_layers_fetch_even_after_another_layer_began():
    # a fetch that waits for a slot lets another thread's fetch of another layer begin: its uses still count
    p = make_policy("mar", 2)
    for layer in range(2):
        p.set_scores(layer, [1.0] * 4)
        _fetch(p, layer, 0)
    p.advance(0)
    p.advance(1)  # another thread, meanwhile
    used_at_age_1 = p.used[0]
    p.on_access((0, 0))  # used at layer 0's fetch, the one after its last use
    assert p.used[0] > used_at_age_1
    p.advance(0)
    assert p.use_probability((0, 0)) > p.use_probability((0, 1))


@pytest.mark.parametrize("name", POLICIES)
def test_under_a_forecast_the_unforeseen_go_first_then_the_farthest(name):
    p = make_policy(name, 2)
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for k in keys:
        p.on_insert(k)
        p.advance(k[0])
        p.on_access(k)
    own = p.victim(keys)
    p.expect(own[0], {own[1]: [1, 5]})  # the policy's own victim is wanted at the next fetch, and at the 5th
    assert p.victim_for(keys) == p.victim([k for k in keys if k != own])  # the policy's order among the rest
    other = next(k for k in keys if k[0] == own[0] and k != own)
    p.expect(own[0], {own[1]: [1, 5], other[1]: [3]})
    pair = [own, other]
    assert p.victim_for(pair) == other  # wanted at 3, own at 1
    p.advance(0)
    p.advance(1)  # fetch 2 under way: own is next wanted at 5, other at 3
    assert p.victim_for(pair) == own
    p.advance(0)
    p.advance(1)  # fetch 4: other's use is past, it is unforeseen now
    assert p.victim_for(pair) == other


def test_a_prefetch_is_refused_a_victim_the_forecast_wants_first():
    p = LRUPolicy()
    p.expect(0, {0: [2], 1: [6]})
    assert p.victim_for([(0, 0), (0, 1)], incoming=(0, 2)) is None  # (0, 2) not forecast: keep what is
    p.expect(0, {0: [2], 1: [6], 2: [4]})
    assert p.victim_for([(0, 0), (0, 1)], incoming=(0, 2)) == (0, 1)  # wanted at 6, after (0, 2) at 4
    assert p.victim_for([(0, 0)], incoming=(0, 2)) is None  # wanted at 2, before it
    assert p.victim_for([(0, 0)]) == (0, 0)  # a fetch's miss always gets a slot


def test_a_forecast_lapses_past_its_horizon_and_an_empty_one_withdraws_it():
    p = LRUPolicy()
    for k in [(0, 0), (0, 1)]:
        p.advance(0)
        p.on_access(k)
    p.expect(0, {0: [1, 2]})
    assert p.victim_for([(0, 0), (0, 1)]) == (0, 1)
    p.advance(0)
    p.advance(0)
    p.advance(0)  # past fetch 2: lru again
    assert p.victim_for([(0, 0), (0, 1)]) == (0, 0)
    p.expect(0, {0: [5]})
    p.expect(0, {})
    assert p.victim_for([(0, 0), (0, 1)]) == (0, 0)
