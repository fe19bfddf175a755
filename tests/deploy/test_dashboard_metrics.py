"""The Grafana dashboard (deploy/grafana/dashboards/marserve.json) queries only metrics a real marserve server
exports: every metric name in its PromQL is checked against the /metrics of a live server on 127.0.0.1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.live_server import live_server

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "marserve.json"
# What the dashboard is for (issue 21): throughput, TTFT, inter-token latency, queue, KV cache, expert cache.
MUST_SHOW = {"marserve:generation_tokens_total", "marserve:time_to_first_token_seconds_bucket",
             "marserve:inter_token_latency_seconds_bucket", "marserve:num_requests_waiting",
             "marserve:kv_cache_usage_perc", "marserve:expert_cache_hit_rate", "marserve:expert_prefetch_precision",
             "marserve:expert_cache_bytes_moved_total"}
_NOT_METRICS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
# Sample names each metric type exposes under its family's name (the text format's suffixes).
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",), "info": ("_info",)}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label
    names (inside {...} or by/without/on/ignoring (...)), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end():].lstrip().startswith("(") or m.group() in _NOT_METRICS:
            continue  # a function (or an aggregation) is followed by its arguments
        names.add(m.group())
    return names


def dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = set().union(*map(promql_metric_names, exprs))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.match(r"\s*label_values\(\s*([^,)]+)", query)
        if m:  # label_values(METRIC, label): the first argument is a series selector
            names |= promql_metric_names(m.group(1))
    return names


def exported_sample_names(metrics_text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_promql_names_are_found_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(marserve:ttft_bucket{model_name=~"$model", x="a(b)"}'
            '[$__rate_interval]))) / ignoring(le) sum(marserve:b) + 1e3 * count without (layer) (up_down)')
    assert promql_metric_names(expr) == {"marserve:ttft_bucket", "marserve:b", "up_down"}


@pytest.fixture(scope="module")
def metrics_text(baby_checkpoint):
    with live_server(baby_checkpoint("qwen3_moe"), engine_kw={"max_model_len": 128}) as (base, _):
        # One completion and one error, so that the histograms and labelled counters have samples too.
        r = httpx.post(f"{base}/v1/completions", json={"model": "baby", "prompt": "hello there", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200
        assert httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10).status_code == 404
        yield httpx.get(f"{base}/metrics", timeout=10).text


def test_every_metric_the_dashboard_queries_is_exported(metrics_text):
    dashboard = json.loads(DASHBOARD.read_text())
    queried = dashboard_metric_names(dashboard)
    exported = exported_sample_names(metrics_text)
    assert MUST_SHOW <= queried, f"the dashboard does not show {sorted(MUST_SHOW - queried)}"
    assert queried <= exported, f"queried but not exported by the server: {sorted(queried - exported)}"
    # and the check itself tells names apart: a name one suffix off is not exported
    assert "marserve:time_to_first_token_seconds" not in exported
    assert "marserve:generation_tokens" not in exported
