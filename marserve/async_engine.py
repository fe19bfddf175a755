"""AsyncEngine: the LLMEngine driven by its own thread, with asyncio streams per request (for the server).

The model step blocks for as long as a forward pass takes, so it runs off the event loop; requests
and aborts cross over under one lock, and outputs come back through per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from marserve.detokenizer import stable_text
from marserve.engine_config import EngineConfig
from marserve.errors import MarserveError
from marserve.expert_provider import ExpertCacheStats, ExpertProvider
from marserve.llm_engine import LLMEngine
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


class EngineDeadError(MarserveError):
    """The engine loop has stopped; no request can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
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

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Let running requests finish for up to `grace_seconds`, then abort the rest and stop."""
        deadline = time.monotonic() + grace_seconds
        while self._queues and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.05)
        for rid in list(self._queues):
            await self.abort(rid)
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    async def generate(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs for this request as they grow; the last one has finished=True."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params)  # raises RequestError for a bad request
            self._queues[request_id] = queue
        self._work.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop stopped: {item}")
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (client disconnect): free the blocks now
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            self._queues.pop(request_id, None)

    def stats(self) -> EngineStats:
        s = self.engine.scheduler
        bm = s.block_manager
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting), kv_cache_usage=bm.usage,
                           prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
                           num_preemptions=s.num_preemptions,
                           prompt_tokens_total=self.engine.prompt_tokens_total,
                           generation_tokens_total=self.engine.generation_tokens_total,
                           expert_cache=[dataclasses.replace(m.stats) for m in self.engine.model.modules()
                                         if isinstance(m, ExpertProvider)])

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    outputs = self.engine.step() if self.engine.has_unfinished else None
                    if outputs is None:
                        self._work.clear()
                    deliveries = [(self._queues.get(o.request_id), o) for o in outputs or []]
                if outputs is None:
                    self._work.wait(0.5)
                    continue
                for queue, out in deliveries:
                    if queue is not None:
                        self._loop.call_soon_threadsafe(queue.put_nowait, _stabilised(out))
                        if out.finished:
                            self._queues.pop(out.request_id, None)
        except BaseException as e:  # noqa: BLE001 - report the death to every waiting request
            logger.exception("engine loop died")
            self.errored, self.dead_error = True, e
            for queue in list(self._queues.values()):
                self._loop.call_soon_threadsafe(queue.put_nowait, e)


def _stabilised(out: RequestOutput) -> RequestOutput:
    """Hold back a half-decoded trailing character on outputs still running."""
    outs = [dataclasses.replace(o, text=stable_text(o.text, o.finished)) for o in out.outputs]
    return dataclasses.replace(out, outputs=outs)
