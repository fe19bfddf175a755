"""`marserve bench experts` on baby models: the command runs, prints its tables, and its figures add up
(counts, bytes, derived precision/recall, the replay's rows reproduced from the saved trace); no timings checked."""

import json

import numpy as np
import pytest

from marserve.bench.expert_replay import SERVED_MODELS, ReplayConfig, replay
from marserve.cli import main
from marserve.experts.traces import RoutingTrace


def test_replay_rows_add_up_and_reproduce_from_the_saved_trace(baby_checkpoint, tmp_path, capsys):
    # a MAR baby with Mixtral-8x7B's routing shape: 32 MoE layers, 8 experts, top-2
    model = baby_checkpoint("mixtral", mar=True, num_layers=32, num_experts=8, top_k=2)
    report_path = tmp_path / "report.json"
    argv = ["bench", "experts", "--quick", "--skip-live", "--replay", f"mixtral-8x7b={model}", "--budgets",
            "0.5,0.25,0.125", "--policies", "lru,mar", "--tiers", "host", "--trace-tokens", "40",
            "--work-dir", str(tmp_path / "work"), "--json", str(report_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "budget 0.125 is below the minimum 0.25" in out  # 2 x 32 of 256 experts: 0.125 runs as 0.25
    assert "lru on-demand, per-layer pools" in out and "mar + prefetch" in out
    assert "target: replay Mixtral-8x7B host 0.25: best" in out and "command: marserve bench experts" in out
    report = json.loads(report_path.read_text())
    rows = report["replay"]
    served = SERVED_MODELS["mixtral-8x7b"]
    assert {r["budget"] for r in rows} == {0.5, 0.25} and len(rows) == 2 * 6
    (trace_file,) = (tmp_path / "work").glob("*.npz")
    trace = RoutingTrace.load(trace_file)
    assert trace.num_tokens == 40 and trace.meta["usage_from"] == "mar_usage"
    for r in rows:
        assert r["lookups"] == r["tokens"] * 32 * 2 == 40 * 64
        assert r["hits"] + r["misses"] == r["lookups"]
        assert r["bytes_moved"] == (r["misses"] + r["prefetches"]) * served.expert_bytes
        assert r["prefetch_hits"] <= r["prefetches"] and r["capacity"] == int(r["budget"] * 256)
        assert r["ms_per_token"] == pytest.approx(1e3 * r["time_s"] / r["tokens"])
        assert r["time_s"] == pytest.approx(r["compute_s"] + r["stall_s"], rel=1e-9)  # a layer waits, or computes
        if "prefetch" not in r["config"]:
            assert r["prefetches"] == 0
    # the offline bound: no row moves fewer experts than Belady on demand, none is faster than its time floor
    assert "offline optimal (Belady), a bound" in out and "; the offline bound: " in out
    for budget in (0.5, 0.25):
        here = [r for r in rows if r["budget"] == budget]
        (bound,) = [r for r in here if r["config"] == "offline optimal (Belady), a bound"]
        assert all(bound["misses"] <= r["misses"] + r["prefetches"] for r in here)
        assert all(bound["time_s"] <= r["time_s"] * (1 + 1e-9) for r in here)
    base = next(r for r in rows if r["budget"] == 0.25 and r["config"] == "lru on-demand")
    again = replay(trace.topk_ids, served, ReplayConfig(0.25, "lru"), usage=trace.usage)
    assert (again.hits, again.misses, again.time_s) == (base["hits"], base["misses"], pytest.approx(base["time_s"]))
    assert base["time_vs_lru"] == 1.0


def test_live_runs_every_configuration_in_its_own_process(baby_checkpoint, tmp_path, capsys):
    # 2 MoE layers x 4 experts, top-2: the store's minimum is max(2 x 2, 4) = 4 of 8 experts (0.5)
    model = baby_checkpoint("qwen3_moe", mar=True, num_layers=2, num_experts=4, top_k=2)
    report_path = tmp_path / "report.json"
    argv = ["bench", "experts", "--quick", "--skip-replay", "--models", str(model), "--budgets", "1,0.5,0.25",
            "--policies", "mar", "--drop-caches", "files", "--json", str(report_path),
            "--live-prefetch-lookahead", "1", "--live-prefetch-min-prob", "0.9"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "budget 0.25 is below the minimum 0.5" in out
    assert "peak RSS MB" in out and "machine:" in out and "host: " in out
    rows = json.loads(report_path.read_text())["live"]
    assert [(r["budget"], r["policy"], r["prefetch"]) for r in rows] == [
        (1.0, "lru", False), (0.5, "mar", False), (0.5, "mar", True)]
    for r in rows:
        assert "error" not in r, r
        assert r["hits"] + r["misses"] == r["lookups"] > 0
        assert r["generated_tokens"] == 8 and r["peak_rss_bytes"] > 0
        assert r["decode_tokens_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["bytes_read"] % r["expert_bytes"] == 0
        assert "posix_fadvise" in r["page_cache"]
        assert len(r["requests"]) == len(r["prompts"]) >= 1  # one record per prompt, adding up to the whole
        assert sum(q["bytes_read"] for q in r["requests"]) == r["bytes_read"]
        assert sum(q["stall_s"] for q in r["requests"]) == pytest.approx(r["stall_s"])
        assert sum(q["seconds"] for q in r["requests"]) <= r["seconds"]
        assert all(0 <= q["stall_s"] <= q["seconds"] for q in r["requests"])
        # the prefill (up to the first token) is a part of each request
        assert all(0 < q["prefill_s"] < q["seconds"] and 0 <= q["prefill_stall_s"] <= q["stall_s"] + 1e-9
                   and 0 <= q["prefill_bytes_read"] <= q["bytes_read"] for q in r["requests"])
        if r["budget"] < 1.0:  # each read a fetch used: when (compute seconds of its request) and how many bytes
            for q in r["requests"]:
                at = [c for c, _ in q["needs"]]
                assert at == sorted(at) and all(0.0 <= c <= q["seconds"] for c in at)
                assert 0 < sum(b for _, b in q["needs"]) <= q["bytes_read"]
                if not r["prefetch"]:  # on demand every read is a miss its own fetch uses
                    assert sum(b for _, b in q["needs"]) == q["bytes_read"]
                assert len({b for _, b in q["needs"]}) == 1  # one expert's bytes on disk each (all alike here)
    for r in rows[1:2]:  # on demand: its routing replayed offline reads what it read; MIN no more
        assert r["replayed_reads"] == r["bytes_read"] // r["expert_file_bytes"] >= r["min_reads"] >= 0
    assert "on-demand reads after the warm-up" in out and "MIN (Belady)" in out
    full = rows[0]
    assert full["misses"] == 0 and full["bytes_read"] == 0 and full["offloading"] == "ResidentExperts"
    assert all(r["offloading"] == "OffloadedExperts" for r in rows[1:])
    assert len({r["output_digest"] for r in rows}) == 1  # greedy outputs do not depend on the budget
    assert (rows[-1]["prefetcher_min_prob"], rows[-1]["prefetcher_adaptive"], rows[-1]["prefetcher_lookahead"]) == (
        0.9, False, 1)  # the knobs reached the engine's prefetcher
    assert "greedy outputs identical across 3 runs: yes" in out


def test_live_runs_can_sample_with_seeds_and_report_the_routing_lookup(baby_checkpoint, tmp_path, capsys):
    model = baby_checkpoint("qwen3_moe", mar=True, num_layers=2, num_experts=4, top_k=2)
    report_path = tmp_path / "report.json"
    argv = ["bench", "experts", "--quick", "--skip-replay", "--models", str(model), "--budgets", "1,0.5",
            "--policies", "mar", "--drop-caches", "files", "--json", str(report_path), "--temperature", "0.9"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(report_path.read_text())["live"]
    assert all(r["temperature"] == 0.9 for r in rows) and len({r["output_digest"] for r in rows}) == 1
    assert "sampled (seeded) outputs identical across 3 runs: yes" in out
    (prefetching,) = [r for r in rows if r["prefetch"] and r["budget"] == 0.5]
    assert prefetching["lookup_steps"] == 7 + 1  # 8 tokens: 7 decode steps, and the warm-up request's one
    assert 0 <= prefetching["lookup_forecasts"] <= 8
    assert 0.0 <= prefetching["lookup_precision"] <= 1.0 and prefetching["forecast_read_steps"] >= 0


def test_bench_model_is_calibrated_once_and_the_file_stays_beside_it(baby_checkpoint, tmp_path, capfd):
    import shutil

    from marserve.bench.expert_calibration import ensure_calibrated
    from marserve.experts.preferences import FILE_NAME, ExpertPreferences
    model = tmp_path / "plain"  # a copy: the cached baby is shared with other tests
    shutil.copytree(baby_checkpoint("mixtral", num_layers=2, num_experts=4, top_k=2), model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"line {i}: the river runs past {i * 7} stones" for i in range(40)))
    assert not (model / FILE_NAME).exists()
    assert ensure_calibrated(model, tokens=256, prompts=str(prompts))
    out = capfd.readouterr().out
    assert f"no {FILE_NAME}" in out and f"marserve calibrate {model} --tokens 256" in out and "wrote " in out
    prefs = ExpertPreferences.load(model / FILE_NAME)
    assert prefs.has_predictors and prefs.source == "calibration"  # the prefetcher's learned predictor
    written = (model / FILE_NAME).stat().st_mtime_ns
    assert not ensure_calibrated(model, tokens=256, prompts=str(prompts))  # cached: not again
    assert (model / FILE_NAME).stat().st_mtime_ns == written and "calibrating" not in capfd.readouterr().out


def test_bench_experts_calibrates_the_bench_model_before_its_live_runs(monkeypatch, tmp_path):
    import argparse

    from marserve.bench import expert_calibration, experts, throughput
    called = []
    monkeypatch.setattr(throughput, "_model_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(expert_calibration, "ensure_calibrated", lambda path: called.append(path))
    models = experts._live_models(argparse.Namespace(models="bench", twin=None))
    assert list(models.values()) == [tmp_path / "bench"] and called == [tmp_path / "bench"]


def test_bench_stall_target_shows_the_on_demand_runs_reads_and_stall_beside_it():
    from marserve.bench.experts import live_targets
    base = {"label": "bench (Mixtral-style)", "output_digest": "d", "expert_bytes": 10, "num_experts_total": 128,
            "peak_rss_bytes": 1, "prefetches": 0, "prefetch_hits": 0, "misses": 0}
    lru = {**base, "budget": 0.25, "policy": "lru", "prefetch": False, "tokens_per_s": 10.0, "bytes_read": 900e6,
           "stall_s": 2.0}
    on = {**base, "budget": 0.25, "policy": "mar", "prefetch": True, "tokens_per_s": 6.0, "bytes_read": 2700e6,
          "stall_s": 2.9, "prefetches": 100, "prefetch_hits": 30}
    (line,) = [ln for ln in live_targets([lru, on]) if "tok/s" in ln]
    # 2700 MB at the on-demand read rate (450 MB/s) is 6 s: 2.9 s meets "<= half", yet it stalled more than lru
    assert "= 0.48 x its disk-read time 6.00 s (target <= 0.5): met" in line
    assert "(it read 2700 MB; on-demand lru read 900 MB and stalled 2.00 s)" in line


def test_large_model_targets_apply_to_a_model_directory_and_show_the_offline_minimum():
    from marserve.bench.experts import live_targets
    base = {"label": "/models/trained-bench", "output_digest": "d", "expert_bytes": 10, "num_experts_total": 128,
            "peak_rss_bytes": 1, "prefetches": 0, "prefetch_hits": 0, "misses": 0, "budget": 0.25}
    lru = {**base, "policy": "lru", "prefetch": False, "tokens_per_s": 10.0, "bytes_read": 900e6, "stall_s": 2.0,
           "replayed_reads": 90, "min_reads": 40}
    mar = {**base, "policy": "mar", "prefetch": False, "tokens_per_s": 14.0, "bytes_read": 500e6, "stall_s": 1.0,
           "replayed_reads": 50, "min_reads": 40}
    on = {**base, "policy": "mar", "prefetch": True, "tokens_per_s": 16.0, "bytes_read": 600e6, "stall_s": 0.9,
          "prefetches": 30, "prefetch_hits": 27}
    lines = live_targets([lru, mar, on])
    (speed,) = [ln for ln in lines if "tok/s" in ln]
    assert speed.startswith("/models/trained-bench 25%: mar+prefetch 16.0 tok/s = 1.60 x lru on-demand")
    assert "/models/trained-bench 25%: experts read on demand after the warm-up: lru 90, mar 50; Belady's MIN on " \
           "the same routing and pool 40 (the fewest any eviction reads)" in lines


def test_overlap_bound_hides_each_request_s_reads_behind_its_own_compute_only():
    from marserve.bench.experts import live_targets, overlap_bound
    # request 1 computes 1.0 s and reads 0.5 s worth: all hidden; request 2 computes 0.5 s and reads 2.0 s worth:
    # 1.5 s must stall, whatever request 1's idle disk could have done
    run = {"requests": [{"seconds": 1.2, "stall_s": 0.2, "bytes_read": 50e6},
                        {"seconds": 2.5, "stall_s": 2.0, "bytes_read": 200e6}]}
    stall, seconds = overlap_bound(run, rate=100e6)
    assert stall == pytest.approx(1.5) and seconds == pytest.approx(1.0 + 2.0)
    assert overlap_bound({}, 100e6) is None and overlap_bound(run, 0.0) is None
    base = {"label": "/models/m", "output_digest": "d", "expert_bytes": 10, "num_experts_total": 128,
            "peak_rss_bytes": 1, "prefetch_hits": 0, "misses": 0, "budget": 0.25, "generated_tokens": 30}
    lru = {**base, "policy": "lru", "prefetch": False, "tokens_per_s": 10.0, "bytes_read": 250e6, "stall_s": 2.5,
           "prefetches": 0}
    on = {**base, "policy": "mar", "prefetch": True, "tokens_per_s": 8.1, "bytes_read": 250e6, "stall_s": 2.2,
          "prefetches": 5, **run}
    (line,) = [ln for ln in live_targets([lru, on]) if "how far overlap can go" in ln]
    # the disk-read time is 2.5 s at lru's rate: >= 1.5 s of stall = 0.60 x; 30 tokens in >= 3 s = 10 tok/s = 1.00 x
    assert "stall >= 1.50 s = 0.60 x its disk-read time and run at <= 1.00 x lru on-demand's tok/s" in line


def test_overlap_bound_lands_each_used_read_before_its_first_use():
    from marserve.bench.experts import overlap_bound
    # 2.0 s of compute, 1.0 s of reads at 100 MB/s: all could hide, but 0.6 s of them are needed by compute 0.1 and
    # the rest by 1.5: the first 60 MB land at 0.6 s at best, 0.5 s after compute reached them
    r = {"seconds": 2.6, "stall_s": 0.6, "bytes_read": 100e6, "needs": [[0.1, 30e6], [0.1, 30e6], [1.5, 40e6]]}
    stall, seconds = overlap_bound({"requests": [r]}, rate=100e6)
    assert stall == pytest.approx(0.5) and seconds == pytest.approx(2.5)
    # needed late enough, nothing stalls; a request with no reads used stalls nothing
    assert overlap_bound({"requests": [{**r, "needs": [[0.7, 60e6], [1.5, 40e6]]}]}, rate=100e6)[0] == 0.0
    assert overlap_bound({"requests": [{**r, "needs": []}]}, rate=100e6)[0] == 0.0


def test_overlap_bound_hides_a_prefill_s_reads_behind_the_prefill_s_compute_only():
    from marserve.bench.experts import overlap_bound
    # 1.0 s of compute against 0.8 s of reads would hide them all, but 0.6 s of them are the prefill's, behind
    # 0.1 s of prefill compute: 0.5 s stall however the decode's 0.2 s of reads are placed
    r = {"seconds": 1.5, "stall_s": 0.5, "bytes_read": 80e6,
         "prefill_s": 0.6, "prefill_stall_s": 0.5, "prefill_bytes_read": 60e6}
    stall, seconds = overlap_bound({"requests": [r]}, rate=100e6)
    assert stall == pytest.approx(0.5) and seconds == pytest.approx(1.5)
    # a decode reading more than its compute can hide: the request's whole reading against its whole compute
    r2 = {**r, "bytes_read": 160e6}
    assert overlap_bound({"requests": [r2]}, rate=100e6)[0] == pytest.approx(0.6)
    # without the prefill apart: the looser per-request bound (all reads hidden behind 1.0 s of compute)
    loose = {k: r[k] for k in ("seconds", "stall_s", "bytes_read")}
    assert overlap_bound({"requests": [loose]}, rate=100e6)[0] == pytest.approx(0.0)
