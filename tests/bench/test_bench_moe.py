"""Smoke test of `marserve bench moe`: tiny shapes, --quick; the command runs and prints its table."""

import json

from marserve.cli import main


def test_bench_moe_runs_and_prints_the_table(capsys):
    argv = ["bench", "moe", "--quick", "--shapes", "32x48x4x2,16x24x3x1", "--tokens", "1,5,300", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "machine (best of " in out and "GB/s" in out and "GFLOP/s" in out
    for T in (1, 5, 300):
        assert f"T={T:5d}: ours" in out
    assert "transformers" in out and "naive" in out and "of bandwidth" in out and "of matmul peak" in out
    assert "command: marserve bench moe" in out
    assert out.count("ours with pack_experts()") == 2  # T=300 re-timed on blocked expert copies, once per shape
    report = json.loads(out.strip().splitlines()[-1])
    assert len(report["results"]) == 6
    for row in report["results"]:
        assert row["ours_ms"] > 0 and row["transformers_ms"] > 0 and row["naive_ms"] > 0
        assert row["weight_bytes"] == row["touched_experts"] * 3 * 4 * (32 * 48 if row["shape"] == "32x48x4x2"
                                                                         else 16 * 24)
