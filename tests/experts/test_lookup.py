"""The routing lookup on its own (no model): matches on the last two tokens, the forecast and its wrap round a
loop, what it refuses to forecast, its precision, and the fetch distances it hands the providers."""

import numpy as np
import pytest

from marserve.experts.lookup import RoutingLookup, forecast_uses

L, K = 3, 2


def _routing(token: int) -> np.ndarray:
    """A made-up routing [L,K] that depends on the token only."""
    return np.array([[token % 5, (token + layer + 1) % 5] for layer in range(L)])


def _pass(lookup, seqs, is_prefill=None, routing=_routing):
    """One forward pass over {key: (start, token ids)}: begin_pass, then every layer's routing -> its forecasts."""
    keys = list(seqs)
    chunks = [seqs[k][1] for k in keys]
    found = lookup.begin_pass(keys, chunks, [seqs[k][0] for k in keys],
                              is_prefill or [len(c) > 1 for c in chunks])
    rows = np.stack([routing(t) for c in chunks for t in c])  # [T,L,K]
    for i in range(L):
        lookup.record(i, rows[:, i])
    return found


def _decode(lookup, tokens, key="a", routing=_routing):
    """Prefill the first two tokens, then decode the rest one by one -> the forecast of each decode step."""
    _pass(lookup, {key: (0, tokens[:2])}, routing=routing)
    return [_pass(lookup, {key: (p, [t])}, routing=routing) for p, t in enumerate(tokens[2:], start=2)]


def test_no_forecast_until_the_last_two_tokens_come_again():
    found = _decode(RoutingLookup(L, K, horizon=4), [7, 8, 9, 7, 9, 7, 8])  # decode inputs at positions 2..6
    assert found[:3] == [None] * 3  # (8,9) (9,7) (7,9) are new
    f = found[3][0]  # (9,7) again at position 5: it ended at 3, so positions 3, 4 and round again
    assert [f[k].tolist() for k in range(4)] == [_routing(t).tolist() for t in (7, 9, 7, 9)]
    assert found[4] is not None  # (7,8) ended at position 1


def test_a_loop_is_forecast_round_and_round():
    lookup = RoutingLookup(L, K, horizon=5)
    found = _decode(lookup, [1, 2, 3, 1, 2, 3, 1])
    f = found[-1][0]  # input 1 after (3, 1): the pair last ended at position 3; the loop 1 2 3 has period 3
    assert f.shape == (5, L, K)
    assert [f[k].tolist() for k in range(5)] == [_routing(t).tolist() for t in (1, 2, 3, 1, 2)]
    assert lookup.forecasts == 3 and lookup.steps == 5  # (3,1) at position 3 was new


def test_prefill_passes_and_batches_with_a_sequence_without_a_match_are_not_forecast():
    lookup = RoutingLookup(L, K)
    _pass(lookup, {"a": (0, [1, 2, 1, 2])})
    assert _pass(lookup, {"a": (4, [1]), "b": (0, [5, 6, 7])}, is_prefill=[False, True]) is None
    assert _pass(lookup, {"a": (5, [2]), "b": (3, [8])}) is None  # b has no match
    both = _pass(lookup, {"a": (6, [1]), "b": (4, [6])})
    assert both is None  # b's (8, 6) is new
    found = _pass(lookup, {"a": (7, [2]), "b": (5, [7])})  # (1,2) and (6,7) both seen before
    assert found is not None and len(found) == 2


def test_positions_from_the_prefix_cache_have_no_routing_to_forecast_from():
    lookup = RoutingLookup(L, K)
    _pass(lookup, {"a": (3, [4, 5])})  # positions 0..2 came from the prefix cache: tokens and routing unknown
    assert _pass(lookup, {"a": (5, [4])}) is None  # (5,4) is new
    assert _pass(lookup, {"a": (6, [5])})[0][0].tolist() == _routing(5).tolist()  # (4,5) at position 4 is known


def test_a_match_older_than_the_window_is_forgotten():
    lookup = RoutingLookup(L, K, horizon=1, window=4)
    found = _decode(lookup, [1, 2, 3, 4, 5, 6, 1, 2])
    assert found[-1] is None  # (1,2) ended at position 1, overwritten in the 4-position window since
    found = _decode(RoutingLookup(L, K, horizon=1, window=8), [1, 2, 3, 4, 5, 6, 1, 2])
    assert found[-1] is not None


def test_a_long_sequence_grows_its_rows_and_still_forecasts_round_its_window():
    lookup = RoutingLookup(L, K, horizon=3, window=256)
    tokens = [100 + t for t in range(180)] * 2  # a 180-token line, then the same line again
    _pass(lookup, {"a": (0, tokens[:150])})  # a prefill longer than the first rows: grown to fit
    found = [_pass(lookup, {"a": (p, [t])}) for p, t in enumerate(tokens[150:], start=150)]
    f = found[-1][0]  # the last input, 100 + 179 at position 359, matches position 179 (rows wrapped since)
    assert [f[k].tolist() for k in range(3)] == [_routing(100 + t).tolist() for t in (179, 0, 1)]
    assert len(lookup._sequences["a"].routed) == 256


def test_a_prefill_longer_than_the_window_keeps_its_last_positions():
    lookup = RoutingLookup(L, K, horizon=2, window=64)
    tokens = [200 + t % 50 for t in range(300)]  # a 50-token line, six times over
    _pass(lookup, {"a": (0, tokens)})
    seq = lookup._sequences["a"]
    assert len(seq.routed) == 64 and sorted(seq.routed.tolist()) == list(range(236, 300))
    f = _pass(lookup, {"a": (300, [200])})[0]  # (249, 200) last ended at 250, kept: positions 250 and 251
    assert [f[k].tolist() for k in range(2)] == [_routing(t).tolist() for t in (200, 201)]


def test_a_batch_beyond_max_sequences_is_not_forecast_and_nothing_kept():
    lookup = RoutingLookup(L, K, max_sequences=2)
    _decode(lookup, [1, 2, 1, 2], key="a")
    assert _pass(lookup, {"a": (4, [1]), "b": (0, [1, 2]), "c": (0, [3, 4])},
                 is_prefill=[False, True, True]) is None
    assert lookup._sequences == {}


def test_a_sequence_that_comes_back_elsewhere_starts_over():
    lookup = RoutingLookup(L, K)
    _decode(lookup, [1, 2, 1, 2])
    assert _pass(lookup, {"a": (9, [1])}) is None  # not where it stopped: another history


def test_precision_counts_the_forecast_experts_the_pass_then_used():
    lookup = RoutingLookup(L, K)
    _decode(lookup, [1, 2, 3, 1, 2, 3, 1, 2])
    assert lookup.precision() == 1.0  # a loop routes as it did
    drift = iter(range(1000))
    _decode(lookup, [1, 2, 3, 1, 2, 3, 1, 2], key="b",
            routing=lambda t: np.full((L, K), next(drift) % 5))  # routing that never repeats
    assert lookup.precision() < 0.7


def test_forecast_uses_counts_fetches_from_now():
    f = np.array([[[0, 1], [2, 3], [0, 2]],  # this pass: positions 0, 1, 2 are fetches 1, 2, 3
                  [[0, 4], [3, 3], [1, 1]]])  # the next pass: fetches 4, 5, 6
    uses = forecast_uses([f, np.array([[[4, -1], [2, 2], [0, 0]]])], L)
    assert uses[0] == {0: [1, 4], 1: [1], 4: [1, 4]}
    assert uses[1] == {2: [2], 3: [2, 5]}
    assert uses[2] == {0: [3], 2: [3], 1: [6]}


def test_horizon_must_be_positive():
    with pytest.raises(ValueError):
        RoutingLookup(L, K, horizon=0)
