"""What completions and chat share: model check, admission, OpenAI fields -> SamplingParams, running
engine requests until done or until the client goes away, and server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from marserve.engine.async_engine import AsyncEngine
from marserve.outputs import RequestOutput
from marserve.sampling_params import SamplingParams
from marserve_server.config import ServerConfig
from marserve_server.errors import APIError, error_body, from_exception
from marserve_server.metrics import ServerMetrics
from marserve_server.protocol import SamplingFields

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25
# Below this, logits / temperature overflows float32 (inf -> NaN probabilities) and the step fails for
# the whole batch; such a temperature means greedy anyway (vLLM treats it the same way).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class ServerState:
    engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics
    draining: bool = False
    num_admitted_seqs: int = 0  # sequences (n per prompt) admitted and not yet answered in full

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def generation_defaults(self) -> dict:
        return self.engine.engine.generation_defaults

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def admit(self, num_seqs: int, param: str = "n") -> Callable[[], None]:
        """Refuse work the server cannot take now: 503 while shutting down or dead, 429 with a full queue,
        400 (naming `param`) for a request larger than the whole queue, which no retry could ever fit.
        Returns the release to call (any number of times) once the response is done.

        Waiting = admitted here and not yet finished, minus what the engine runs. The engine's own
        waiting count would miss a burst: requests admitted in the same instant are still on their way
        to the engine thread, so every one of them would see a short queue."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if not self.engine.is_running:
            raise APIError(503, "the engine has stopped; this server cannot generate", code="engine_dead",
                           headers={"Retry-After": "30"})
        limit = self.config.max_queue_len
        if num_seqs > limit:
            raise APIError(400, f"this request needs {num_seqs} sequences (prompts x n), more than the "
                                f"{limit} the server lets wait (--max-queue-len); split it",
                           param=param, code="queue_limit_exceeded")
        waiting = max(0, self.num_admitted_seqs - self.engine.stats().num_running)
        if waiting + num_seqs > limit:
            raise APIError(429, f"the request queue is full ({waiting} sequences waiting, {num_seqs} more asked, "
                                f"limit {limit}); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        self.num_admitted_seqs += num_seqs
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.num_admitted_seqs -= num_seqs

        return release

    def check_prompt_chars(self, num_chars: int, param: str = "prompt") -> None:
        """Refuse, before tokenizing it, text that cannot fit in the context: tokenizing costs seconds per
        megabyte of CPU and memory, and the answer would be a 400 anyway."""
        per_token = self.config.max_prompt_chars_per_token
        limit = self.engine.max_model_len * per_token
        if num_chars > limit:
            raise APIError(400, f"the prompt has {num_chars} characters: more than fit in this model's context of "
                                f"{self.engine.max_model_len} tokens at {per_token} characters per token at most "
                                f"({limit}; --max-prompt-chars-per-token)",
                           param=param, code="context_length_exceeded")

    def check_stops(self, req: SamplingFields) -> None:
        """Stop strings and ids are checked after every token of every sequence: bound how many and how long."""
        c = self.config
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > c.max_stop_strings:
            raise APIError(400, f"{len(stops)} stop strings; at most {c.max_stop_strings} (--max-stop-strings)",
                           param="stop", code="too_many_stop_strings")
        longest = max(map(len, stops), default=0)
        if longest > c.max_stop_string_chars:
            raise APIError(400, f"a stop string of {longest} characters; at most {c.max_stop_string_chars} "
                                f"(--max-stop-string-chars)", param="stop", code="stop_string_too_long")
        num_ids = len(req.stop_token_ids or ())
        if num_ids > c.max_stop_token_ids:
            raise APIError(400, f"{num_ids} stop_token_ids; at most {c.max_stop_token_ids} (--max-stop-token-ids)",
                           param="stop_token_ids", code="too_many_stop_token_ids")


def warn_if_tokens_outrun_the_prompt_bound(tokenizer, chars_per_token: int) -> None:
    """check_prompt_chars assumes no token spans more than `chars_per_token` characters; with a tokenizer
    that has longer tokens a prompt made of them could fit and still be refused. Vocabulary strings are
    at least as long as the text they stand for (byte-level BPE spells each byte as one character)."""
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: nothing to check
        return
    if longest > chars_per_token:
        logger.warning("this tokenizer has tokens of up to %d characters, more than max_prompt_chars_per_token=%d: "
                       "a prompt made of them could be refused although it fits; raise the bound",
                       longest, chars_per_token)


def sampling_params(req: SamplingFields, *, default_max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, defaults: dict | None = None) -> SamplingParams:
    """OpenAI fields -> SamplingParams; fields the request leaves out take the checkpoint's
    generation_config.json values (`defaults`), as vLLM does, else SamplingParams' own."""
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format type '{req.response_format.type}' is not supported; only 'text'",
                       param="response_format")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    defaults = defaults or {}
    optional = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(req, name) if getattr(req, name) is not None else defaults.get(name)
        if value is not None:
            optional[name] = value
    if 0.0 < optional.get("temperature", 1.0) < GREEDY_TEMPERATURE:
        optional["temperature"] = 0.0
    # SamplingParams checks ranges and names the parameter (SamplingParamsError -> 400).
    return SamplingParams(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, seed=req.seed, stop=req.stop,
                          stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
                          ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          skip_special_tokens=req.skip_special_tokens, **optional)


async def off_loop(fn, *args):
    """Run fn(*args) in a worker thread: tokenizing a multi-megabyte prompt takes seconds, and on the
    event loop it would stall every stream and health check for that long."""
    return await asyncio.to_thread(fn, *args)


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out


async def run_to_end(state: ServerState, raw: Request, jobs: list[tuple[dict, SamplingParams, str]]
                     ) -> list[RequestOutput]:
    """Run engine requests to completion; a client that disconnects aborts all of them at once."""
    tasks = [asyncio.ensure_future(_last(state.engine.generate(prompt, params, rid))) for prompt, params, rid in jobs]
    # No asyncio.gather wrapper: cancelling its children left it holding a CancelledError nobody
    # retrieved, which asyncio logged as an ERROR with a traceback on every disconnect.
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_SECONDS,
                                               return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # the first failure ends the wait (and the request)
            if pending and await raw.is_disconnected():  # nobody to answer: free the engine now (nginx's 499)
                raise APIError(499, "the client closed the request", code="client_disconnected")
        outs = [t.result() for t in tasks]
    except BaseException:
        for t in tasks:
            t.cancel()  # closes each engine stream, which aborts its request and frees its blocks
        await asyncio.gather(*tasks, return_exceptions=True)  # also retrieves every task's exception
        raise
    for out in outs:
        state.metrics.observe_finished(out)
        if out.error:
            raise APIError(500, out.error, code="generation_failed")
    return outs


async def merged_streams(state: ServerState, jobs: list[tuple[dict, SamplingParams, str]]
                         ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(job index, cumulative output) from all jobs as they arrive; closing this closes every engine stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, prompt, params, rid):
        try:
            async for out in state.engine.generate(prompt, params, rid):
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - delivered to the consumer, which reports it
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, *job)) for i, job in enumerate(jobs)]
    open_jobs = len(jobs)
    try:
        while open_jobs:
            i, item = await queue.get()
            if item is None:
                open_jobs -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                if item.finished:
                    state.metrics.observe_finished(item)
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _released_after(body: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for event in body:
            yield event
    finally:
        release()


def event_stream(body: AsyncIterator[str], release: Callable[[], None]) -> StreamingResponse:
    """A server-sent-events response that releases its admission when it ends, or when it is dropped
    unstarted (the client left before the first byte: the generator's `finally` would never run)."""
    events = _released_after(body, release)
    weakref.finalize(events, release)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class StreamChunks:
    """One streamed response: its chunks' fixed fields, and how much of each choice was already sent."""

    def __init__(self, base_id: str, obj: str, model: str):
        self.head = {"id": base_id, "object": obj, "created": int(time.time()), "model": model}
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = dict(self.head, choices=choices)
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def advance(self, index: int, o) -> tuple[str, int, int] | None:
        """(new text, first new token's index, first new character's offset) for choice `index`, or None
        when nothing new is there to send."""
        text_at, token_at = self.sent_text.get(index, 0), self.sent_tokens.get(index, 0)
        delta = o.text[text_at:]
        if not delta and len(o.token_ids) == token_at and not o.finished:
            return None
        self.sent_text[index], self.sent_tokens[index] = len(o.text), len(o.token_ids)
        return delta, token_at, text_at

    @property
    def completion_tokens(self) -> int:
        return sum(self.sent_tokens.values())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


def sse_error(e: BaseException) -> str:
    err = from_exception(e)
    return sse(error_body(err.status, err.message, err.param, err.code))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])
