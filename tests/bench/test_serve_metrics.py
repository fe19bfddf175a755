"""The serving benchmark's math on hand-made timelines: TTFT, TPOT, ITL, E2EL, throughputs, goodput, SLO parsing."""

import math

import pytest

from marserve.bench.serve_metrics import RequestResult, format_report, parse_slo, stats_ms, summarize
from marserve.errors import ConfigError


def _runs():
    # r1: first chunk at 100 ms, then gaps of 50 and 100 ms, done at 300 ms: TPOT (300 - 100) / 2 = 100 ms.
    r1 = RequestResult(ok=True, prompt_tokens=10, output_tokens=3, chunk_times=[0.10, 0.15, 0.25], latency=0.30)
    # r2: first chunk at 200 ms, one gap of 20 ms: TPOT (220 - 200) / 1 = 20 ms.
    r2 = RequestResult(ok=True, prompt_tokens=6, output_tokens=2, chunk_times=[0.20, 0.22], latency=0.22)
    # r3: one token only: a TTFT and an E2EL, but no TPOT and no gap.
    r3 = RequestResult(ok=True, prompt_tokens=4, output_tokens=1, chunk_times=[0.30], latency=0.31)
    bad = RequestResult(ok=False, latency=0.05, error="HTTP 429: queue full")
    return [r1, r2, r3, bad, RequestResult(ok=False, error="HTTP 429: queue full")]


def test_per_request_figures():
    r1, r2, r3, *_ = _runs()
    assert r1.ttft == pytest.approx(0.10) and r1.itls == pytest.approx([0.05, 0.10]) and r1.tpot == pytest.approx(0.10)
    assert r2.tpot == pytest.approx(0.02)
    assert r3.tpot is None and r3.itls == []


def test_summary_throughputs_latencies_and_errors():
    s = summarize(_runs(), duration=2.0)
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["errors"] == {"HTTP 429: queue full": 2}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (20, 6)
    assert s["request_throughput"] == pytest.approx(1.5)  # failed requests do not count
    assert s["output_throughput"] == pytest.approx(3.0)
    assert s["total_token_throughput"] == pytest.approx(13.0)
    assert s["goodput"] is None
    # TTFT over the successful requests: 100, 200, 300 ms; p90 interpolates between 200 and 300.
    assert s["ttft_ms"] == pytest.approx({"mean": 200.0, "median": 200.0, "p90": 280.0, "p99": 298.0})
    # TPOT: one value per request with >= 2 tokens (100, 20), each request weighing the same.
    assert s["tpot_ms"]["mean"] == pytest.approx(60.0) and s["tpot_ms"]["median"] == pytest.approx(60.0)
    # ITL: every gap of every request pooled: 50, 100, 20.
    assert s["itl_ms"]["mean"] == pytest.approx(170 / 3) and s["itl_ms"]["median"] == pytest.approx(50.0)
    assert s["e2el_ms"]["mean"] == pytest.approx((300 + 220 + 310) / 3)


def test_goodput_counts_requests_within_every_slo():
    runs = _runs()
    assert summarize(runs, 2.0, parse_slo("ttft:150"))["goodput"] == pytest.approx(0.5)  # r1 only
    assert summarize(runs, 2.0, parse_slo("tpot:50"))["goodput"] == pytest.approx(1.0)  # r2, and r3 (no TPOT)
    assert summarize(runs, 2.0, parse_slo("ttft:250 tpot:50"))["goodput"] == pytest.approx(0.5)  # r2 only
    assert summarize(runs, 2.0, parse_slo("e2el:300,ttft:1000"))["goodput"] == pytest.approx(1.0)  # r1, r2
    assert summarize(runs, 2.0, parse_slo("ttft:1"))["goodput"] == 0.0


def test_no_samples_give_nan_and_the_report_still_prints():
    s = summarize([RequestResult(ok=False, error="ConnectError")], duration=1.0, slo=parse_slo("ttft:100"))
    assert math.isnan(s["ttft_ms"]["mean"]) and s["completed"] == 0 and s["goodput"] == 0.0
    text = format_report(s, "dead")
    assert "failed requests" in text and "error x1: ConnectError" in text and "goodput" in text
    assert math.isnan(stats_ms([])["p99"])


def test_parse_slo():
    assert parse_slo("ttft:500 tpot:50") == pytest.approx({"ttft": 0.5, "tpot": 0.05})
    assert parse_slo(None) == {} and parse_slo("") == {}
    for bad in ("ttft", "latency:5", "ttft:abc", "ttft:0", "tpot:-1"):
        with pytest.raises(ConfigError, match="--goodput"):
            parse_slo(bad)
