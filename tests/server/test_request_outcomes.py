"""/metrics counts every generation request once on arrival and once by how it ended, and the two add up."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from marserve_server.request_outcomes import outcome_of
from tests.server.live_server import live_server

KEY = "k-outcomes"


@pytest.fixture(scope="module")
def server(baby_checkpoint):
    with live_server(baby_checkpoint("qwen3_moe"), engine_kw={"max_model_len": 128}, api_key=KEY) as (base, app):
        # The first request may build the native kernels (a minute on a loaded host): not part of any count.
        httpx.post(f"{base}/v1/completions", json={"prompt": "warm", "max_tokens": 4, "stream": True},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
        yield base, app


def _counts(base: str) -> dict[str, float]:
    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in family.samples:
            if s.name == "marserve:requests_received_total":
                counts["received"] = s.value
            elif s.name == "marserve:requests_ended_total":
                counts[s.labels["outcome"]] = s.value
    return counts


def _settled(base: str) -> dict[str, float]:
    """The counts once every request has ended (a stream's handler ends a moment after its client)."""
    deadline = time.monotonic() + 10
    while True:
        c = _counts(base)
        ended = sum(c.get(o, 0) for o in ("finished", "aborted", "rejected", "failed"))
        if ended == c.get("received", 0) or time.monotonic() > deadline:
            return c
        time.sleep(0.05)


def test_each_outcome_is_counted_and_they_add_up(server, monkeypatch):
    base, app = server
    auth = {"Authorization": f"Bearer {KEY}"}
    before = _settled(base)
    ok = {"prompt": "the rivers of", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{base}/v1/completions", json=ok, headers=auth, timeout=120).status_code == 200
    r = httpx.post(f"{base}/v1/completions", json={**ok, "stream": True}, headers=auth, timeout=120)
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    assert httpx.post(f"{base}/v1/completions", json=ok, timeout=120).status_code == 401  # the guard's answer
    assert httpx.post(f"{base}/v1/completions", json={**ok, "n": 99}, headers=auth, timeout=120).status_code == 400
    assert httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, headers=auth, timeout=120).status_code == 400

    def fail_seeded(p):
        if p.seed == 4242:
            raise RuntimeError("injected")

    monkeypatch.setattr(app.state.server.engine.engine.sampler, "fault_hook", fail_seeded)
    assert httpx.post(f"{base}/v1/completions", json={**ok, "seed": 4242, "temperature": 1}, headers=auth,
                      timeout=120).status_code == 500
    r = httpx.post(f"{base}/v1/completions", json={**ok, "seed": 4242, "temperature": 1, "stream": True},
                   headers=auth, timeout=120)
    assert r.status_code == 200 and '"generation_failed"' in r.text  # a stream fails by an error event
    with httpx.stream("POST", f"{base}/v1/completions", headers=auth, timeout=120,
                      json={**ok, "max_tokens": 100, "ignore_eos": True, "stream": True}) as s:
        next(s.iter_lines())  # one event, then leave
    after = _settled(base)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta == {"received": 8, "finished": 2, "rejected": 3, "failed": 2, "aborted": 1}, delta
    assert after["received"] == sum(after[o] for o in ("finished", "aborted", "rejected", "failed"))
    assert httpx.get(f"{base}/health").status_code == 200  # other paths are not counted
    assert _counts(base)["received"] == after["received"]


@pytest.mark.parametrize("answer, outcome", [
    ((None, False, False, True), "failed"), ((None, False, False, False), "aborted"),
    ((499, False, True, False), "aborted"), ((503, False, True, False), "failed"),
    ((429, False, True, False), "rejected"), ((200, True, True, False), "failed"),
    ((200, False, False, False), "aborted"), ((200, False, True, False), "finished")])
def test_outcome_of(answer, outcome):
    assert outcome_of(*answer) == outcome
