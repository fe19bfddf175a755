"""`marserve bench reads` on a baby checkpoint: the table has both read paths (and the raw reads) at every reader
count, every figure is positive, no read came back with a wrong checksum, and the report names the command and the
machine; no timings checked."""

import json
import logging

import pytest

from marserve.bench.expert_reads import expert_index, expert_sequence
from marserve.cli import main


@pytest.mark.parametrize("chunks", ["whole runs", "queued chunks"])
def test_reads_table_has_both_paths_at_every_reader_count(baby_checkpoint, tmp_path, capsys, caplog, monkeypatch,
                                                          chunks):
    if chunks == "queued chunks":  # the baby's experts (24 KiB) through the disk queue, as large ones go
        from marserve.experts import slow_tier
        monkeypatch.setattr(slow_tier, "PIPE_CHUNK", 2 * 4096)
    model = baby_checkpoint("mixtral", num_layers=2, num_experts=4)
    report_path = tmp_path / "reads.json"
    argv = ["bench", "reads", "--model", str(model), "--experts", "6", "--threads", "1,2", "--repeats", "1",
            "--quick", "-q", "--json", str(report_path)]
    with caplog.at_level(logging.WARNING, logger="marserve.experts.slow_tier"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert not [r for r in caplog.records if "wrong checksum" in r.getMessage()]  # each reader has its own slot
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert sorted((r["path"], r["readers"]) for r in rows) == sorted(
        (p, t) for p in ("raw preadv", "direct", "page cache") for t in (1, 2))
    for r in rows:
        assert r["alone_gbs"] > 0 and r["ms_per_read"] > 0
        if r["path"] != "raw preadv":  # the tier's paths also ran beside the decode stand-in
            assert r["beside_gbs"] > 0 and r["decode_share"] > 0 and r["decode_alone_per_s"] > 0
            assert 0 < r["decode_share_vs_best"] == r["decode_beside_per_s"] / max(
                x["decode_alone_per_s"] for x in rows if "decode_alone_per_s" in x)
    assert report["experts_per_run"] == 6 and report["raw_best_gbs"] > 0
    assert set(report["checksums_gbs"]) == {"zlib.crc32", "crc32c.crc32c"}
    assert all(v > 0 for v in report["checksums_gbs"].values())
    for line in ("path        readers alone GB/s", "\ndirect ", "\npage cache ", "raw disk: best ", "load average",
                 "machine: ", "GB/s memory read bandwidth", "command: marserve bench reads", "host: "):
        assert line in out


def test_expert_sequence_reads_every_expert_before_repeating_one(baby_checkpoint):
    index, _ = expert_index(baby_checkpoint("mixtral", num_layers=2, num_experts=4))
    keys = expert_sequence(index, 20, seed=3)
    assert len(keys) == 20 and len(set(keys[:8])) == 8 and len(set(keys[8:16])) == 8
    assert keys == expert_sequence(index, 20, seed=3)  # the same sequence for every run
