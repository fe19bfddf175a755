"""marserve_client against a mock transport (shapes, SSE, retries, typed errors) and against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

import marserve_client as mc
from marserve_client.streaming import iter_events
from marserve_client.types import Completion

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "hi", "finish_reason": "length", "logprobs": None}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}, "brand_new_field": 1}


def _err(status, message="nope", param=None, code=None, headers=None):
    return httpx.Response(status, json={"error": {"message": message, "type": "x", "param": param, "code": code}},
                          headers=headers)


def _client(handler, **kw):
    client = mc.Client(base_url="http://test/v1", api_key="k", transport=httpx.MockTransport(handler), **kw)
    client.slept = []
    client._sleep = client.slept.append
    return client


def test_request_shape_and_typed_response():
    seen = {}

    def handler(request: httpx.Request):
        seen["path"], seen["auth"] = request.url.path, request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json=COMPLETION)

    r = _client(handler).completions.create(model="m", prompt="x", max_tokens=3, temperature=None,
                                             extra_body={"ignore_eos": True})
    assert seen == {"path": "/v1/completions", "auth": "Bearer k",
                    "body": {"model": "m", "prompt": "x", "max_tokens": 3, "ignore_eos": True}}
    assert isinstance(r, Completion) and r.choices[0].text == "hi" and r.usage.total_tokens == 3
    assert r.brand_new_field == 1  # a newer server's extra fields survive


def test_sse_parsing_multiline_comments_and_done():
    lines = [": keep-alive", "", 'data: {"id":"a","model":"m","choices":[{"index":0,', 'data: "text":"x"}]}', "",
             "event: ignored", 'data: {"id":"b","model":"m","choices":[{"index":0,"text":"y"}]}', "",
             "data: [DONE]", "", 'data: {"id":"never","model":"m","choices":[]}', ""]
    chunks = list(iter_events(lines, Completion))
    assert [c.choices[0].text for c in chunks] == ["x", "y"]


def test_stream_through_the_client_and_mid_stream_error():
    events = ('data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
              'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"he"}}]}\n\n'
              'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"y"},"finish_reason":"stop"}]}'
              '\n\ndata: [DONE]\n\n')
    client = _client(lambda req: httpx.Response(200, text=events, headers={"content-type": "text/event-stream"}))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "hey"
    broken = 'data: {"error": {"message": "boom", "type": "internal_server_error", "code": "generation_failed"}}\n\n'
    client = _client(lambda req: httpx.Response(200, text=broken))
    with pytest.raises(mc.StreamError) as e:
        list(client.completions.create(model="m", prompt="x", stream=True))
    assert e.value.code == "generation_failed"


@pytest.mark.parametrize("status,cls", [(400, mc.BadRequestError), (401, mc.AuthenticationError),
                                        (404, mc.NotFoundError), (413, mc.RequestTooLargeError),
                                        (429, mc.RateLimitError), (503, mc.ServiceUnavailableError),
                                        (500, mc.InternalServerError), (418, mc.APIStatusError)])
def test_typed_errors_carry_the_body(status, cls):
    client = _client(lambda req: _err(status, "bad thing", param="temperature", code="c"), max_retries=0)
    with pytest.raises(cls) as e:
        client.completions.create(model="m", prompt="x")
    assert (e.value.status_code, e.value.message, e.value.param, e.value.code) == (status, "bad thing",
                                                                                   "temperature", "c")


def test_retries_429_and_503_with_retry_after_then_succeeds():
    answers = iter([_err(429, headers={"Retry-After": "3"}), _err(503), httpx.Response(200, json=COMPLETION)])
    client = _client(lambda req: next(answers), max_retries=2)
    assert client.completions.create(model="m", prompt="x").choices[0].text == "hi"
    assert client.slept[0] == 3.0 and 0 < client.slept[1] <= 1.0  # Retry-After honoured, then jittered backoff


def test_no_retry_on_400_and_gives_up_after_max_retries():
    calls = []
    client = _client(lambda req: calls.append(1) or _err(400), max_retries=3)
    with pytest.raises(mc.BadRequestError):
        client.completions.create(model="m", prompt="x")
    assert len(calls) == 1
    calls.clear()
    client = _client(lambda req: calls.append(1) or _err(503), max_retries=2)
    with pytest.raises(mc.ServiceUnavailableError):
        client.models.list()
    assert len(calls) == 3


def test_connection_errors_and_timeouts():
    def refuse(req):
        raise httpx.ConnectError("refused")

    def slow(req):
        raise httpx.ReadTimeout("slow")

    client = _client(refuse, max_retries=1)
    with pytest.raises(mc.APIConnectionError):
        client.health()
    assert len(client.slept) == 1
    with pytest.raises(mc.APITimeoutError):
        _client(slow, max_retries=0).health()


def test_async_client_create_stream_and_errors():
    events = 'data: {"id":"a","model":"m","choices":[{"index":0,"text":"x"}]}\n\ndata: [DONE]\n\n'

    def handler(req):
        body = json.loads(req.content)
        if body.get("stream"):
            return httpx.Response(200, text=events)
        if body["prompt"] == "bad":
            return _err(400, param="prompt")
        return httpx.Response(200, json=COMPLETION)

    async def main():
        async with mc.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler)) as client:
            whole = await client.completions.create(model="m", prompt="x")
            texts = [c.choices[0].text async for c in await client.completions.create(model="m", prompt="x",
                                                                                       stream=True)]
            with pytest.raises(mc.BadRequestError):
                await client.completions.create(model="m", prompt="bad")
            return whole.choices[0].text, texts

    assert asyncio.run(main()) == ("hi", ["x"])


def test_the_sdk_imports_without_torch():
    code = "import sys, marserve_client; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_against_a_real_server(baby_checkpoint):
    from tests.server.live_server import live_server
    with live_server(baby_checkpoint("qwen3_moe"), api_key="k") as (base, _):
        with mc.Client(base_url=base, api_key="k") as client:
            assert client.health().status == "ok" and client.models.list().data[0].id == "baby"
            whole = client.completions.create(model="baby", prompt="rivers", max_tokens=6, temperature=0,
                                              ignore_eos=True)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="baby", prompt="rivers", max_tokens=6, temperature=0, ignore_eos=True, stream=True) if c.choices)
            assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 6
            chat = client.chat.completions.create(model="baby", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0)
            assert chat.choices[0].message.role == "assistant"
            toks = client.tokenize(prompt="hello")
            assert client.detokenize(toks.tokens) and toks.count == len(toks.tokens)
            with pytest.raises(mc.BadRequestError) as e:
                client.completions.create(model="baby", prompt="x", temperature=-1)
            assert e.value.param == "temperature"
            with pytest.raises(mc.NotFoundError):
                client.completions.create(model="other", prompt="x")
        with pytest.raises(mc.AuthenticationError):
            mc.Client(base_url=base, api_key="wrong").models.list()
