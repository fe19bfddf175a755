"""Expert placement: round_robin, the routing statistics, `mar`'s balanced affinity-aware solve, and its measure."""

from __future__ import annotations

import torch

from marserve.experts import placement as pl
from marserve.experts import placement_eval as pe


def _planted_trace(T=4000, L=4, E=8, seed=0):
    """Two kinds of token: kind A uses experts perm_l[0:4] at every layer, kind B perm_l[4:8], where the
    permutation differs per layer, so that round_robin splits every kind over both ranks."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(E, generator=g) for _ in range(L)]
    kind = torch.randint(0, 2, (T,), generator=g)
    ids = []
    for l in range(L):
        pick = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)])  # [T,2] within the kind's four
        ids.append(perms[l][pick + 4 * kind[:, None]])
    return ids


def test_round_robin_deals_experts_in_turn():
    p = pl.round_robin(num_layers=2, num_experts=8, num_ranks=4)
    assert p.ranks.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    assert p.local_experts(1, 2) == [2, 6]


def test_stats_from_trace_count_usage_coselection_and_chains():
    ids = [torch.tensor([[0, 1], [0, 2]]), torch.tensor([[3, 1], [2, 3]])]
    s = pl.RoutingStats.from_trace(ids, 4)
    assert s.usage[0].tolist() == [0.5, 0.25, 0.25, 0.0]
    assert s.coselect[0][0, 1] == 0.5 and s.coselect[0][1, 0] == 0.5 and s.coselect[0][0, 0] == 0
    assert s.chain[0].sum() == 0  # the first layer has no predecessor
    # both tokens' top-1 at layer 0 is expert 0; they go on to {3,1} and {2,3}
    assert s.chain[1][0].tolist() == [0.0, 0.5, 0.5, 1.0]


def test_mar_keeps_planted_chains_local_and_balanced():
    ids = _planted_trace()
    stats = pl.RoutingStats.from_trace(ids, 8)
    first = pe.first_layer_ranks([len(ids[0])], 2)
    rr = pe.evaluate(pl.round_robin(4, 8, 2), ids, first, hidden_size=16, element_size=2)
    placed = pl.mar(stats, 2)
    m = pe.evaluate(placed, ids, first, hidden_size=16, element_size=2)
    assert m.local_share >= 1.5 * rr.local_share
    assert m.bytes_per_token < rr.bytes_per_token
    assert placed.imbalance(stats.usage) <= 0.1 + 1e-9
    assert all(len(placed.local_experts(l, r)) == 4 for l in range(4) for r in range(2))


def test_mar_respects_the_load_limit_under_skewed_usage():
    g = torch.Generator().manual_seed(1)
    # Layer 1 strongly prefers the chain 0 -> {0,1,2,3}: without the limit all heavy experts share a rank.
    ids = [torch.randint(0, 8, (3000, 2), generator=g) for _ in range(3)]
    ids[1][:2000] = torch.randint(0, 4, (2000, 2), generator=g)
    ids[0][:2000, 0] = 0
    stats = pl.RoutingStats.from_trace(ids, 8)
    placed = pl.mar(stats, 2, tolerance=0.1)
    for l in range(3):
        best = pl._deviation(stats.usage[l], pl._balanced(stats.usage[l], pl._capacities(8, 2)), 2)
        loads = placed.loads(stats.usage)[l]
        assert float(((loads - loads.mean()).abs() / loads.mean()).max()) <= max(0.1, best) + 1e-9
    unlimited = pl.mar(stats, 2, tolerance=10.0)
    assert pl.objective(stats, unlimited.ranks) >= pl.objective(stats, placed.ranks)


def test_stats_from_mar_memory_find_the_chains():
    # Expert a's prototypes at layer 0 are (near) expert perm[a]'s at layer 1: the chain must say a -> perm[a].
    g = torch.Generator().manual_seed(2)
    E, S, H = 4, 2, 32
    m0 = torch.nn.functional.normalize(torch.randn(E, S, H, generator=g), dim=-1)
    perm = torch.tensor([2, 0, 3, 1])
    m1 = torch.empty_like(m0)
    m1[perm] = m0
    stats = pl.RoutingStats.from_mar(torch.stack([m0, m1]), torch.full((2, E), 0.25))
    assert stats.chain[1].argmax(1).tolist() == perm.tolist()
    assert torch.allclose(stats.usage.sum(1), torch.ones(2, dtype=torch.float64))


def test_evaluate_counts_local_assignments_and_messages():
    # One layer, 2 tokens on ranks 0 and 1; experts 0,1 on rank 0 and 2,3 on rank 1.
    p = pl.Placement("x", 2, torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]))
    ids = [torch.tensor([[0, 2], [2, 3]]), torch.tensor([[1, 3], [0, 1]])]
    m = pe.evaluate(p, ids, torch.tensor([0, 1]), hidden_size=4, element_size=2)
    # layer 0: token 0 (rank 0) 1 of 2 local, one message; token 1 (rank 1) 2 local.
    # layer 1: token ranks = ranks of top-1 at layer 0 = [0, 1]; token 0: 1 local + 1 msg; token 1: 0 local, 1 msg
    assert m.local_share == 4 / 8
    assert m.messages_per_token == 3 / 2
    assert m.bytes_per_token == 2 * 1.5 * 4 * 2


def test_report_measures_every_placement_on_a_mar_checkpoint(baby_checkpoint, capsys):
    model = baby_checkpoint("qwen3_moe", mar=True)
    r = pe.report(model, 2, seq_len=32, max_tokens=256)
    names = [row["placement"] for row in r["rows"]]
    assert names == ["round_robin", "mar (MAR memory + usage)", "mar (calibration trace)"]
    for row in r["rows"]:
        assert 0.0 <= row["local_share"] <= 1.0 and row["bytes_per_token"] >= 0
        assert sorted(sum(row["ranks"], [])) == [0] * 4 + [1] * 4  # 2 layers x 4 experts, 2 per rank per layer
    pe.print_report(r)
    assert "the local assignments of round_robin" in capsys.readouterr().out


def test_serving_takes_the_best_placement_of_an_inspect_report(tmp_path):
    import json

    import pytest

    from marserve.engine.distributed import placement_from_file
    from marserve.errors import ConfigError
    rows = [{"placement": "round_robin", "local_share": 0.5, "ranks": [[0, 1, 0, 1]]},
            {"placement": "mar (calibration trace)", "local_share": 0.7, "ranks": [[0, 0, 1, 1]]}]
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"num_ranks": 2, "rows": rows}))
    assert placement_from_file(f, 2, 1, 4) == {"name": "mar (calibration trace)", "num_ranks": 2,
                                               "ranks": [[0, 0, 1, 1]]}
    with pytest.raises(ConfigError, match="for 2 ranks, not 4"):
        placement_from_file(f, 4, 1, 4)
    with pytest.raises(ConfigError, match="this model has 2 x 4"):
        placement_from_file(f, 2, 2, 4)
