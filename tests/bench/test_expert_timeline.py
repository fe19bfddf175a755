"""`python -m marserve.bench.expert_timeline` on a baby model: per-request spans add up; no timing checked."""

from marserve.bench.expert_timeline import covered, main, measure
from tests.experts.checkpoints import SIZES


def test_covered_counts_overlapping_spans_once():
    assert covered([]) == 0.0
    assert covered([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert covered([(3.0, 4.0), (0.0, 1.0), (1.0, 1.5)]) == 2.5


def test_timeline_accounts_for_each_request(baby_checkpoint, capsys):
    path = str(baby_checkpoint("mixtral", **SIZES))  # 4 MoE layers x 8 experts: 25% = 8 slots
    rows = measure(path, 0.25, "lru", ["the fox", "a b c d"], tokens=6, prefetch=False)
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= r["stall_s"] <= r["wall_s"] and abs(r["compute_s"] + r["stall_s"] - r["wall_s"]) < 1e-9
        assert r["prefetched"] == 0 and r["reads"] > 0  # on demand at the minimum budget: every request misses
        assert 0.0 < r["disk_busy_s"] <= r["wall_s"] and 0.0 <= r["idle_s"] <= r["compute_s"] + 1e-9
        assert 0.0 < r["prefill_s"] <= r["wall_s"] and 0.0 <= r["prefill_stall_s"] <= r["stall_s"] + 1e-9
        assert 0 < r["prefill_reads"] <= r["reads"]
    assert main(["--model", path, "--prompts", "1", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "idle while computing" in out and "command: python -m marserve.bench.expert_timeline --model" in out
    assert "host: " in out
