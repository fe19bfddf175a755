"""The serving benchmark's load: prompts, arrival times, and the streaming HTTP clients that time each request.

Talks to any OpenAI-compatible server (marserve, vLLM, llama.cpp, ...) over /v1/completions or
/v1/chat/completions with `stream: true`; nothing here imports torch or the engine. Requests arrive at
a given rate (gaps drawn from a gamma distribution: burstiness 1 is a Poisson process, below 1 burstier,
above 1 steadier; an infinite rate sends them all at once), and at most --max-concurrency are in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from marserve.bench.serve_metrics import RequestResult
from marserve.errors import ConfigError, MarserveError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Synthetic prompts without a tokenizer: short common words, one token each in the usual BPE vocabularies,
# so that N words are about N tokens (the server's usage report gives the exact count when it sends one).
_WORDS = ("the of and to in is was for on that with as by at from his her they this had not are but "
          "one all were when we there can an your which their said if will each about how up out them "
          "then she many some so these would other into has more two like him see time could no make "
          "than first been its who now people my made over did down only way find use may water long "
          "little very after words called just where most know").split()


@dataclass
class LoadConfig:
    """What one `marserve bench serve` run sends, and where (the swept rates and concurrencies included)."""

    base_url: str
    endpoint: str = "completions"
    model: str | None = None  # None: the first model the server lists at /v1/models
    num_prompts: int = 64  # requests per point of the sweep
    request_rates: tuple[float, ...] = (math.inf,)  # requests/s; inf sends every request at once
    burstiness: float = 1.0
    max_concurrencies: tuple[int | None, ...] = (None,)  # None: no limit
    input_len: int = 128
    output_len: int = 128
    dataset: str | None = None  # JSONL of {"prompt": ..., "output_len": ...}
    tokenizer: str | None = None  # a directory (or file) with tokenizer.json; 'default': the shipped model's
    api_key: str | None = None
    ignore_eos: bool = True
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with http:// or https:// (got {self.base_url!r})")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):  # accept the OpenAI SDK's form of the address too
            self.base_url = self.base_url[:-3]
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"--endpoint must be one of {', '.join(ENDPOINTS)} (got {self.endpoint!r})")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not self.request_rates or any(not r > 0 for r in self.request_rates):
            raise ConfigError(f"--request-rate must be > 0 requests/s or 'inf' (got {list(self.request_rates)})")
        if not self.burstiness > 0:
            raise ConfigError(f"--burstiness must be > 0 (1 = Poisson; got {self.burstiness})")
        if not self.max_concurrencies or any(c is not None and c < 1 for c in self.max_concurrencies):
            raise ConfigError(f"--max-concurrency must be >= 1 (got {list(self.max_concurrencies)})")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be > 0 s (got {self.timeout_s})")
        if self.dataset is not None and not Path(self.dataset).is_file():
            raise ConfigError(f"--dataset {self.dataset}: no such file")

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class BenchRequest:
    prompt: str
    prompt_tokens: int  # counted by the tokenizer when there is one, else estimated (one per word)
    output_len: int


# ---- prompts -------------------------------------------------------------------------------------------


def load_tokenizer(name: str | None):
    """A `tokenizers.Tokenizer` from a model directory or tokenizer.json ('default': the shipped model's)."""
    if name is None:
        return None
    from tokenizers import Tokenizer
    if name == "default":
        from marserve import DEFAULT_MODEL_DIR
        name = str(DEFAULT_MODEL_DIR)
    path = Path(name)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"--tokenizer {name}: no tokenizer.json there (give a model directory or the file)")
    return Tokenizer.from_file(str(path))


def read_dataset(path: str, num_prompts: int, output_len: int, tokenizer) -> list[BenchRequest]:
    """JSONL, one {"prompt": str, "output_len": int (optional)} per line; cycled if shorter than num_prompts."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt, out = obj["prompt"], int(obj.get("output_len", output_len))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"--dataset {path}, line {lineno}: expected a JSON object with a \"prompt\" "
                              "string and optionally an integer \"output_len\"") from None
        if not isinstance(prompt, str) or out < 1:
            raise ConfigError(f"--dataset {path}, line {lineno}: \"prompt\" must be a string, \"output_len\" >= 1")
        count = len(tokenizer.encode(prompt, add_special_tokens=False).ids) if tokenizer else len(prompt.split())
        rows.append(BenchRequest(prompt, count, out))
    if not rows:
        raise ConfigError(f"--dataset {path}: no prompts in it")
    return [rows[i % len(rows)] for i in range(num_prompts)]


def synthetic_requests(num_prompts: int, input_len: int, output_len: int, tokenizer, seed: int) -> list[BenchRequest]:
    """Random prompts of about input_len tokens. Each differs from the others from its first token on, so a
    server's prefix cache cannot serve one from another (nor from another point of a sweep: a new seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_prompts):
        if tokenizer is None:
            out.append(BenchRequest(" ".join(rng.choice(_WORDS, input_len)), input_len, output_len))
            continue
        # Random ids above the first 256 (where vocabularies keep special and byte tokens), decoded to text;
        # re-encoding text can merge or split tokens, so the count is taken again from the text sent.
        vocab = tokenizer.get_vocab_size()
        ids = rng.integers(min(256, vocab // 2), vocab, input_len).tolist()
        text = tokenizer.decode(ids)
        out.append(BenchRequest(text, len(tokenizer.encode(text, add_special_tokens=False).ids), output_len))
    return out


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Seconds after the start at which each of n requests is sent: the first at 0, then gamma-distributed
    gaps of mean 1/rate (shape = burstiness, so the gaps' coefficient of variation is 1/sqrt(burstiness))."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()


# ---- one request ---------------------------------------------------------------------------------------


def payload(cfg: LoadConfig, model: str, req: BenchRequest, max_tokens: int | None = None) -> dict:
    n = req.output_len if max_tokens is None else max_tokens
    body = {"model": model, "max_tokens": n, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:  # vLLM's extras (marserve has them too): exactly n tokens, whatever the model samples
        body.update(ignore_eos=True, min_tokens=n)
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _is_token_chunk(obj: dict, chat: bool) -> bool:
    """A chunk that carries output: it has a choice, and (chat) is not the role-only announcement that opens
    a chat stream. A chunk with empty text still counts: the server held back half a character."""
    choices = obj.get("choices")
    if not choices:
        return False
    delta = choices[0].get("delta") or {}
    return not (chat and "role" in delta and not delta.get("content"))


def error_message(status: int, body: bytes) -> str:
    """An OpenAI-shaped error body -> its message; anything else -> its first 200 characters."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}: {message}" if status else message


async def send(client: httpx.AsyncClient, cfg: LoadConfig, body: dict, req: BenchRequest) -> RequestResult:
    """Sends one streamed request and times every chunk against the moment it was sent."""
    chat = cfg.endpoint == "chat"
    times: list[float] = []
    usage = None
    t0 = time.perf_counter()

    def failed(error: str) -> RequestResult:
        return RequestResult(ok=False, chunk_times=times, latency=time.perf_counter() - t0, error=error)

    try:
        async with client.stream("POST", cfg.url, json=body, headers=cfg.headers) as resp:
            if resp.status_code != 200:
                return failed(error_message(resp.status_code, await resp.aread()))
            # OpenAI-compatible servers send each event as one `data:` line; comments and blank lines are skipped.
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if not isinstance(obj, dict):
                    return failed("the stream held an event that is not a JSON object")
                if "error" in obj:
                    return failed(error_message(0, data.encode()))
                if _is_token_chunk(obj, chat):
                    times.append(now - t0)
                usage = obj.get("usage") or usage
    except httpx.HTTPError as e:
        return failed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    except ValueError:
        return failed("the stream held a line that is not JSON")
    if not times:
        return failed("the stream ended with no output")
    return RequestResult(ok=True, prompt_tokens=(usage or {}).get("prompt_tokens") or req.prompt_tokens,
                         output_tokens=(usage or {}).get("completion_tokens") or len(times),
                         chunk_times=times, latency=time.perf_counter() - t0)


def new_client(cfg: LoadConfig, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=10.0),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


# ---- a whole point of the sweep ------------------------------------------------------------------------


async def check_server(cfg: LoadConfig, first: BenchRequest) -> str:
    """Before timing anything: the server answers, the model name is known, and one request of the kind the
    run sends succeeds (it also warms the server up). Returns the model name; MarserveError otherwise."""
    async with new_client(cfg, 1) as client:
        try:
            resp = await client.get(cfg.base_url + "/v1/models", headers=cfg.headers, timeout=10.0)
        except httpx.HTTPError as e:
            reason = str(e) or type(e).__name__
            raise MarserveError(f"cannot reach {cfg.base_url} ({reason}); is the server running there? "
                                "(--base-url)") from None
        model = cfg.model
        if resp.status_code == 401:
            raise MarserveError(f"{cfg.base_url} refused the request (HTTP 401): give its key with --api-key")
        if model is None:
            try:
                model = resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                why = error_message(resp.status_code, resp.content)
                raise MarserveError(f"{cfg.base_url}/v1/models did not list a model ({why}); name one with --model") \
                    from None
        result = await send(client, cfg, payload(cfg, model, first, max_tokens=min(first.output_len, 8)), first)
    if not result.ok:
        raise MarserveError(f"the test request to {cfg.url} failed: {result.error}")
    return model


async def run_point(cfg: LoadConfig, model: str, requests: list[BenchRequest], rate: float,
                    max_concurrency: int | None, on_done=None) -> tuple[list[RequestResult], float]:
    """Sends `requests` at `rate` with at most `max_concurrency` in flight; (results in order, seconds from the
    first send to the last finish). `on_done(result)` is called as each request finishes (the progress bar)."""
    offsets = arrival_offsets(len(requests), rate, cfg.burstiness, np.random.default_rng(cfg.seed))
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    async with new_client(cfg, max_concurrency or len(requests)) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with limit:  # a request that arrives while every slot is busy waits for one, unsent
                result = await send(client, cfg, payload(cfg, model, req), req)
            if on_done is not None:
                on_done(result)
            return result

        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        return list(results), time.perf_counter() - start
