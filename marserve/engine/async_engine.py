"""AsyncEngine: the LLMEngine driven by its own thread, with asyncio streams per request (for the server).

The model step blocks for as long as a forward pass takes, so it runs off the event loop, and the
event loop never waits for it: new requests and aborts go into an inbox that the engine thread
drains between steps (the engine thread alone touches the engine), and outputs come back through
per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import collections
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from marserve.engine.detokenizer import stable_text
from marserve.engine_config import EngineConfig
from marserve.errors import MarserveError, RequestError
from marserve.experts.provider import ExpertCacheStats, ExpertProvider
from marserve.engine.llm_engine import LLMEngine
from marserve.outputs import RequestOutput
from marserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    expert_cache: list[ExpertCacheStats] = dataclasses.field(default_factory=list)  # one per MoE layer
    # The offloaded expert store's state (0 without one): reads in flight and slots a forward pass pins are 0
    # when the engine is idle; rereads counts reads whose checksum failed and were read again.
    expert_reads_in_flight: int = 0
    expert_pinned_slots: int = 0
    expert_rereads: int = 0


class EngineDeadError(MarserveError):
    """The engine loop has stopped; no request can be served."""


class ShuttingDownError(MarserveError):
    """The server is stopping: a request still running when the shutdown grace ran out was ended."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: collections.deque = collections.deque()  # ("add", ...) / ("abort", id), in order
        self._work = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False  # drained: new requests are refused, running ones were ended
        self.errored = False
        self.dead_error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.errored

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="marserve-engine", daemon=True)
        self._thread.start()

    async def drain(self, grace_seconds: float) -> None:
        """Let running requests finish for up to `grace_seconds`; then end the rest with a
        ShuttingDownError their consumers see (a stream can still say why it stops), and refuse new ones."""
        deadline = time.monotonic() + grace_seconds
        while self._queues and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.05)
        self._closed = True
        for request_id, queue in list(self._queues.items()):
            await self.abort(request_id)
            queue.put_nowait(ShuttingDownError("the server is shutting down; this request was stopped before it "
                                               "finished"))

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Drain (see `drain`), then stop the engine thread."""
        await self.drain(grace_seconds)
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def prepare(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and check a request now, from the event loop: (text, token ids) or RequestError."""
        return self.engine.prepare(prompt, params)

    async def generate(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs for this request as they grow; the last one has finished=True."""
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._queues:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        prepared = self.engine.prepare(prompt, params)  # raises RequestError for a bad request
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._inbox.append(("add", request_id, prompt, params, time.time(), prepared))
        self._work.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, MarserveError):
                    finished = True  # refused by the engine: nothing to abort
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop stopped: {item}")
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (client disconnect): free the blocks now
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """The engine frees the request's blocks before its next step."""
        self._queues.pop(request_id, None)
        self._inbox.append(("abort", request_id))
        self._work.set()

    def stats(self) -> EngineStats:
        s = self.engine.scheduler
        bm = s.block_manager
        store = self.engine.expert_store
        in_flight, pinned = store.in_use() if store is not None else (0, 0)
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting), kv_cache_usage=bm.usage,
                           prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
                           num_preemptions=s.num_preemptions,
                           prompt_tokens_total=self.engine.prompt_tokens_total,
                           generation_tokens_total=self.engine.generation_tokens_total,
                           expert_cache=[dataclasses.replace(m.stats) for m in self.engine.model.modules()
                                         if isinstance(m, ExpertProvider)],
                           expert_reads_in_flight=in_flight, expert_pinned_slots=pinned,
                           expert_rereads=store.slow.rereads if store is not None else 0)

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished:
                    self.engine.check_health()  # an expert-parallel rank that died while idle ends the loop
                    self._work.clear()
                    if not self._inbox:
                        self._work.wait(0.5)
                    continue
                outputs = self.engine.step()
                deliveries = [(self._queues.get(o.request_id), o) for o in outputs]
                for queue, out in deliveries:
                    if queue is not None:
                        self._loop.call_soon_threadsafe(queue.put_nowait, _stabilised(out))
                        if out.finished:
                            self._queues.pop(out.request_id, None)
        except BaseException as e:  # noqa: BLE001 - report the death to every waiting request
            logger.exception("engine loop died")
            self.errored, self.dead_error = True, e
            # (a MarserveError put raw would read as this request's own error: say the engine died)
            dead = EngineDeadError(f"the engine loop stopped: {e}") if isinstance(e, MarserveError) else e
            for queue in list(self._queues.values()):
                self._loop.call_soon_threadsafe(queue.put_nowait, dead)


    def _drain_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "abort":
                self.engine.abort(item[1])
                continue
            _, request_id, prompt, params, arrival, prepared = item
            if request_id not in self._queues:
                continue  # aborted before it ever reached the engine
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time=arrival, prepared=prepared)
            except Exception as e:  # noqa: BLE001 - one unstartable request must not stop the loop
                if not isinstance(e, MarserveError):
                    logger.exception("request %s could not be started", request_id)
                    e = RequestError(f"the request could not be started: {type(e).__name__}: {e}")
                self._loop.call_soon_threadsafe(self._queues.pop(request_id).put_nowait, e)


def _stabilised(out: RequestOutput) -> RequestOutput:
    """Hold back a half-decoded trailing character on outputs still running."""
    outs = [dataclasses.replace(o, text=stable_text(o.text, o.finished)) for o in out.outputs]
    return dataclasses.replace(out, outputs=outs)
