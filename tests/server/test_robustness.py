"""No request body makes the server answer 5xx; SIGTERM drains; a dead engine shows on /health; the shipped model serves."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marserve import DEFAULT_MODEL_DIR
from tests.server.live_server import free_port, live_server
from tests.server.openapi_strategies import request_bodies

# Text includes lone surrogates ("\\ud800" is valid JSON but not Unicode a tokenizer can encode).
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                         st.floats(allow_nan=False, allow_infinity=False), any_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4)), max_leaves=8)
POST_PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "n", "logprobs",
          "top_logprobs", "echo", "stream", "stream_options", "user", "response_format", "stop_token_ids",
          "min_tokens", "ignore_eos", "best_of", "suffix", "tokens"]
field_values = {
    "model": st.one_of(st.just("baby"), st.text(max_size=5)),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 400), max_size=6),
                        st.lists(st.text(max_size=8), max_size=3), json_values),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system",
                                                                                    "bad"]),
                                                          "content": st.one_of(st.text(max_size=20), json_values)}),
                                   max_size=3), json_values),
    "max_tokens": st.one_of(st.integers(-3, 6), json_values),
    "n": st.one_of(st.integers(-1, 20), json_values),
    "logprobs": st.one_of(st.integers(-1, 25), st.booleans(), json_values),
    "top_logprobs": st.one_of(st.integers(-1, 25), json_values),
    "stream": st.booleans(),
    # The edges of the accepted ranges, where float32 sampling overflows and 64-bit seeds end.
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([5e-324, 1e-40, 1e-5]), json_values),
    "top_p": st.one_of(st.floats(0, 1), st.just(1e-300)),
    "repetition_penalty": st.one_of(st.floats(0, 2000), st.sampled_from([1e-300, 1e-3, 1e3])),
    "seed": st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**63 - 1, -(2**63), 2**64])),
}
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).flatmap(
    lambda d: st.fixed_dictionaries({k: field_values.get(k, st.just(v)) for k, v in d.items()}))


@pytest.fixture(scope="module")
def server(baby_checkpoint):
    with live_server(baby_checkpoint("qwen3_moe"), engine_kw={"max_model_len": 64}) as (base, app):
        yield base, app


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(POST_PATHS), body=bodies)
def test_no_request_body_gets_a_5xx(server, path, body):
    _post_and_check(server[0], path, body)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bodies_drawn_from_the_openapi_schema_get_no_5xx(server, data):
    base, app = server
    path = data.draw(st.sampled_from(POST_PATHS))
    body = data.draw(request_bodies(app.openapi(), path), label="body")
    if body.get("model") is not None:
        body["model"] = "baby"  # any other name stops at the 404 before the paths worth exploring
    r = _post_and_check(base, path, body)
    if r.status_code == 400:  # a JSON object was sent: whatever is wrong with it has a name
        assert r.json()["error"]["param"], (path, body, r.text)


def _post_and_check(base: str, path: str, body: dict) -> httpx.Response:
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] > 4:
            body[field] = 4  # keep generation short: the property is about validation
    body.setdefault("max_tokens", 2)
    # json.dumps escapes lone surrogates as \\udXXX, as a client in another language might send them
    r = httpx.post(base + path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (path, body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):  # a 5xx can hide in a stream's events
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert not any("error" in e for e in events), (path, body, r.text)
    assert httpx.get(base + "/health").status_code == 200  # and it keeps serving
    return r


def test_a_dead_engine_shows_on_health_and_requests_get_503(baby_checkpoint):
    with live_server(baby_checkpoint("qwen3_moe")) as (base, app):
        engine = app.state.server.engine
        engine.errored = True  # what the engine thread sets when its loop dies
        try:
            assert httpx.get(base + "/health").status_code == 503
            r = httpx.post(base + "/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead" and r.headers["retry-after"]
        finally:
            engine.errored = False


def test_sigterm_finishes_running_requests_then_exits(baby_checkpoint):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "marserve.cli", "serve", str(baby_checkpoint("qwen3_moe")),
                             "--port", str(port), "--dtype", "float32", "--shutdown-grace", "20",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a start on a loaded 2-core host took over a minute
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start")
        # The first request may build the native kernels (minutes on a loaded host): not within the grace.
        httpx.post(base + "/v1/completions", json={"prompt": "warm", "max_tokens": 4}, timeout=600)
        events = []

        def stream():
            with httpx.stream("POST", base + "/v1/completions", timeout=300,
                              json={"prompt": "a long answer", "max_tokens": 60, "temperature": 0,
                                    "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)

        t = threading.Thread(target=stream)
        t.start()
        while not events and t.is_alive():  # (a stream that failed would leave events empty for good)
            time.sleep(0.01)
        assert events, "the stream failed before its first event"
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert events[-1] == "data: [DONE]" and len(events) > 10  # the running request finished
        # A drained SIGTERM is an orderly stop: exit 0 (uvicorn alone raises the signal again: -15)
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode()
        assert "Traceback" not in out, out


def test_requests_outliving_the_grace_end_with_an_error_not_a_cut(baby_checkpoint, monkeypatch, caplog):
    """When the shutdown grace runs out the engine's requests are ended first: a stream gets an error event
    and [DONE], a whole request an OpenAI-shaped 503; uvicorn then closes with nothing left to cut."""
    with live_server(baby_checkpoint("qwen3_moe"), shutdown_grace_seconds=0.3) as (base, app):
        engine = app.state.server.engine
        real_step = engine.engine.step

        def slow_step():  # 200 tokens now take > 4 s: far beyond the grace
            time.sleep(0.02)
            return real_step()

        monkeypatch.setattr(engine.engine, "step", slow_step)
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(caplog.handler)  # uvicorn's own loggers do not propagate to the root
        body = {"prompt": "a long answer", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        events, answers = [], {}

        def stream():
            try:
                with httpx.stream("POST", base + "/v1/completions", json=dict(body, stream=True), timeout=30) as r:
                    events.extend(line for line in r.iter_lines() if line)
            except httpx.HTTPError as e:
                answers["stream"] = e

        def whole():
            try:
                answers["whole"] = httpx.post(base + "/v1/chat/completions", timeout=30, json={
                    "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 200,
                    "temperature": 0, "ignore_eos": True})
            except httpx.HTTPError as e:
                answers["whole"] = e

        threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while (not events or engine.stats().num_running < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        app.state.test_server.handle_exit(signal.SIGTERM, None)
        for t in threads:
            t.join(30)
        uvicorn_log.removeHandler(caplog.handler)
    assert "stream" not in answers, answers
    assert events[-1] == "data: [DONE]", events[-3:]
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "shutting_down" and err["type"] == "service_unavailable_error", err
    whole_answer = answers["whole"]
    assert isinstance(whole_answer, httpx.Response), whole_answer
    assert whole_answer.status_code == 503 and whole_answer.json()["error"]["code"] == "shutting_down"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def _read_until_closed(sock: socket.socket) -> bytes | None:
    """What the server sends until it closes the connection; None if it keeps it open for 10 s."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    return data


def test_half_sent_requests_are_closed_after_the_read_timeout(baby_checkpoint, caplog):
    """A client must send its whole request within the read timeout: half a head, half a body, or half of
    the next request on a keep-alive connection (uvicorn's keep-alive timer stops at its first byte)."""
    with live_server(baby_checkpoint("qwen3_moe"), request_read_timeout_seconds=0.5) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        half_head, half_body, keep_alive = socks
        half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applic")
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": \"a")
        keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"ok"' not in first:
            first += keep_alive.recv(65536)
        keep_alive.sendall(b"GET /hea")
        assert _read_until_closed(half_head) == b""
        assert _read_until_closed(half_body) == b""
        assert _read_until_closed(keep_alive) == b""
        for s in socks:
            s.close()
        assert httpx.get(base + "/health").status_code == 200  # and it goes on serving
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_the_shipped_default_model_serves_chat():
    with live_server(DEFAULT_MODEL_DIR, model_name="marserve-default") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="marserve-default", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is 12 + 7?"}])
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
