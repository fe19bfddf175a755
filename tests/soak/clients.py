"""The soak's HTTP clients: send one Spec, read the answer (whole or streamed), and record what happened."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from tests.soak.workload import Spec

REQUEST_TIMEOUT = 300.0  # no request of the mix takes near this long: reaching it counts as a hang


@dataclass
class Result:
    spec: Spec
    t_start: float
    t_end: float = 0.0
    t_first: float | None = None  # first event carrying generated text (streams without echo)
    status: int | None = None
    outcome: str = ""  # ok, disconnected, http_error, stream_error, conn_error, hang
    code: str | None = None  # the error's code (OpenAI-shaped body or stream event)
    texts: dict[int, str] = field(default_factory=dict)  # choice index -> text
    detail: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start


def _headers(spec: Spec, api_key: str) -> dict:
    h = {} if isinstance(spec.body, dict) or spec.body is None else {"content-type": "application/json"}
    if spec.auth == "key":
        h["authorization"] = f"Bearer {api_key}"
    elif spec.auth is not None:
        h["authorization"] = f"Bearer {spec.auth}"
    return h


def _error_code(text: str) -> str | None:
    try:
        return json.loads(text)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _add_texts(res: Result, choices: list[dict], chat: bool) -> bool:
    """Appends each choice's new text; True if any was generated text."""
    got = False
    for c in choices:
        piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
        if piece:
            res.texts[c["index"]] = res.texts.get(c["index"], "") + piece
            got = True
    return got


async def _stream(client: httpx.AsyncClient, spec: Spec, res: Result, kw: dict) -> None:
    chat = spec.path.endswith("chat/completions")
    echo = bool(spec.body.get("echo"))
    async with client.stream(spec.method, spec.path, **kw) as r:
        res.status = r.status_code
        if r.status_code != 200:
            res.outcome, res.code = "http_error", _error_code((await r.aread()).decode(errors="replace"))
            return
        events = 0
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                res.outcome, res.code = "stream_error", event["error"].get("code")
                res.detail = event["error"].get("message", "")[:200]
            else:
                got = _add_texts(res, event.get("choices", []), chat)
                if got and res.t_first is None and not (echo and events == 0):
                    res.t_first = time.monotonic()
            events += 1
            if spec.disconnect_after_chunks is not None and events >= spec.disconnect_after_chunks:
                res.outcome = "disconnected"  # leaving the block closes the connection mid-stream
                return
        if res.outcome == "stream_error":
            res.detail += "" if done else " (and no [DONE])"
        elif done:
            res.outcome = "ok"
        else:
            res.outcome, res.detail = "conn_error", "the stream ended without [DONE]"


async def _whole(client: httpx.AsyncClient, spec: Spec, res: Result, kw: dict) -> None:
    r = await client.request(spec.method, spec.path, **kw)
    res.status = r.status_code
    if r.status_code != 200:
        res.outcome, res.code = "http_error", _error_code(r.text)
        return
    chat = spec.path.endswith("chat/completions")
    for c in r.json()["choices"]:
        res.texts[c["index"]] = (c["message"]["content"] or "") if chat else c["text"]
    res.outcome = "ok"


async def send(client: httpx.AsyncClient, spec: Spec, api_key: str) -> Result:
    """Sends `spec` and records the outcome; never raises (a hang is an outcome too)."""
    res = Result(spec, time.monotonic())
    kw = {"headers": _headers(spec, api_key)}
    if isinstance(spec.body, dict):
        kw["json"] = spec.body
    elif spec.body is not None:
        kw["content"] = spec.body
    try:
        await asyncio.wait_for((_stream if spec.stream else _whole)(client, spec, res, kw), REQUEST_TIMEOUT)
    except asyncio.TimeoutError:
        res.outcome, res.detail = "hang", f"no answer within {REQUEST_TIMEOUT:.0f} s"
    except (httpx.HTTPError, OSError) as e:
        res.outcome, res.detail = "conn_error", f"{type(e).__name__}: {e}"[:200]
    except Exception as e:  # noqa: BLE001 - a malformed answer is a finding, not a crash of the soak
        res.outcome, res.detail = "bad_answer", f"{type(e).__name__}: {e}"[:200]
    res.t_end = time.monotonic()
    return res


def new_client(base: str, num_clients: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=num_clients + 8, max_keepalive_connections=num_clients + 8)
    return httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10))


async def run_clients(base: str, api_key: str, num_clients: int, seconds: float, next_spec,
                      on_result=None) -> list[Result]:
    """`num_clients` loops, each sending next_spec(client_index) until `seconds` have passed."""
    results: list[Result] = []
    deadline = time.monotonic() + seconds
    async with new_client(base, num_clients) as client:
        async def loop(i: int):
            while time.monotonic() < deadline:
                res = await send(client, next_spec(i), api_key)
                results.append(res)
                if on_result is not None:
                    on_result(res)
        await asyncio.gather(*(loop(i) for i in range(num_clients)))
    return results
