"""Requests cheap to send and costly to serve (huge prompts, prompt lists, stop lists) are refused before any work."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.live_server import live_server


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class CountingTokenizer:
    """The engine's tokenizer, counting the calls that tokenize text and noting any made on the event loop."""

    def __init__(self, inner):
        self.inner, self.calls, self.on_loop = inner, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self._note("tokenize")
        return self.inner(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.calls += 1
        self._note("encode")
        return self.inner.encode(*args, **kwargs)

    def decode(self, ids, *args, **kwargs):
        if len(ids) > 1:  # (single tokens are decoded on the loop for logprobs; a whole prompt must not be)
            self._note("decode")
        return self.inner.decode(ids, *args, **kwargs)

    def _note(self, what: str) -> None:
        if _on_event_loop():
            self.on_loop.append(what)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def server(baby_checkpoint):
    with live_server(baby_checkpoint("qwen3_moe"), engine_kw={"max_model_len": 128}) as (base, app):
        yield base, app


@pytest.fixture()
def tokenizer(server, monkeypatch):
    engine = server[1].state.server.engine.engine
    counting = CountingTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", counting)
    return counting


def _post(base, path, body):
    return httpx.post(base + path, json=body, timeout=60)


def _error(r: httpx.Response, status: int, param: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_the_counting_tokenizer_sees_what_the_server_tokenizes(server, tokenizer):
    """Else the zero counts below would prove nothing."""
    base, _ = server
    assert _post(base, "/v1/completions", {"prompt": "hello there", "max_tokens": 1}).status_code == 200
    assert _post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 1}).status_code == 200
    assert _post(base, "/tokenize", {"prompt": "hi"}).status_code == 200
    assert tokenizer.calls == 3


def test_tokenizing_and_decoding_prompts_never_run_on_the_event_loop(server, tokenizer):
    """A megabyte of text or a million ids takes the loop's whole attention for a second or more."""
    base, _ = server
    chat = [{"role": "user", "content": "hi there"}]
    for path, body in [("/v1/completions", {"prompt": "hello there", "max_tokens": 2}),
                       ("/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "stream": True}),
                       ("/v1/chat/completions", {"messages": chat, "max_tokens": 2}),
                       ("/tokenize", {"prompt": "hello there"}), ("/tokenize", {"messages": chat}),
                       ("/detokenize", {"tokens": [5, 6, 7, 8]})]:
        assert _post(base, path, body).status_code == 200, path
    assert tokenizer.calls >= 4 and tokenizer.on_loop == []


def test_a_4mb_prompt_is_refused_without_tokenizing(server, tokenizer):
    """128 tokens of context x 64 characters per token at most: 4 MB cannot fit, and is not tokenized to see."""
    base, app = server
    text = "a" * 4_000_000  # one "word": the slowest case for a BPE tokenizer
    err = _error(_post(base, "/v1/completions", {"prompt": text, "max_tokens": 2}), 400, "prompt",
                 "context_length_exceeded")
    assert "4000000 characters" in err["message"] and "8192" in err["message"]
    _error(_post(base, "/v1/completions", {"prompt": ["short", text]}), 400, "prompt", "context_length_exceeded")
    _error(_post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}), 400,
           "messages", "context_length_exceeded")
    _error(_post(base, "/tokenize", {"prompt": text}), 400, "prompt", "context_length_exceeded")
    _error(_post(base, "/tokenize", {"messages": [{"role": "user", "content": text}]}), 400, "messages",
           "context_length_exceeded")
    assert tokenizer.calls == 0
    assert app.state.server.num_admitted_seqs == 0  # the refused chat request gave its admission back


def test_a_list_of_800k_prompts_is_refused_without_tokenizing(server, tokenizer, monkeypatch):
    base, app = server
    state = app.state.server
    many = ["a"] * 800_000
    _error(_post(base, "/v1/completions", {"prompt": many}), 400, "prompt", "too_many_prompts")
    # Past the prompt bound, admission comes before tokenizing: more than the whole queue is a 400 ...
    monkeypatch.setattr(state.config, "max_prompts_per_request", 10**6)
    _error(_post(base, "/v1/completions", {"prompt": many}), 400, "prompt", "queue_limit_exceeded")
    # ... and a full queue a 429, before one prompt is tokenized.
    monkeypatch.setattr(state, "num_admitted_seqs", state.config.max_queue_len)
    r = _post(base, "/v1/completions", {"prompt": ["a", "b"]})
    _error(r, 429, None, "queue_full")
    _error(_post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}), 429, None,
           "queue_full")
    assert tokenizer.calls == 0


def test_stop_lists_are_bounded(server, tokenizer):
    base, _ = server
    chat = {"messages": [{"role": "user", "content": "a"}]}
    for path, body in [("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", chat)]:
        _error(_post(base, path, {**body, "stop_token_ids": [1] * 400_000}), 400, "stop_token_ids",
               "too_many_stop_token_ids")
        _error(_post(base, path, {**body, "stop": [f"s{i}" for i in range(17)]}), 400, "stop",
               "too_many_stop_strings")
        _error(_post(base, path, {**body, "stop": "x" * 1025}), 400, "stop", "stop_string_too_long")
    assert tokenizer.calls == 0
    # At the bounds, the request is served.
    r = _post(base, "/v1/completions", {"prompt": "a", "max_tokens": 2, "stop_token_ids": [1] * 256,
                                        "stop": ["x" * 1024] + [f"s{i}" for i in range(15)]})
    assert r.status_code == 200, r.text
