"""LLMEngine: the synchronous engine loop - schedule, prefetch, execute, sample, update.

Owns the model runner, the scheduler (with its block manager) and the sampler; turns requests into
sequences and finished sequences back into RequestOutputs.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import time
from dataclasses import dataclass, field

import torch

from marserve import progress
from marserve.engine import distributed
from marserve.engine.block_manager import BlockManager
from marserve.engine.detokenizer import IncrementalDetokenizer
from marserve.engine_config import EngineConfig
from marserve.errors import ConfigError, RequestError
from marserve.loader import generation_defaults, load_model, load_tokenizer
from marserve.engine.model_runner import ModelRunner
from marserve.native_memory import HeapTrimmer, bound_onednn_caches
from marserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from marserve.engine.sampler import Sampler, SamplerOutput
from marserve.sampling_params import SamplingParams
from marserve.engine.scheduler import Scheduler, SchedulerOutput
from marserve.engine.sequence import Sequence
from marserve_kernels import native_build

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    generators: list[torch.Generator | None]
    metrics: RequestMetrics
    logprobs: list[list[dict[int, Logprob]]] = field(default_factory=list)
    # position -> logprobs of the prompt token there (position 0 has none), when asked
    prompt_logprobs: dict[int, dict[int, Logprob]] = field(default_factory=dict)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)  # one per sequence
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        bound_onednn_caches()  # before packing or running the model creates the first oneDNN primitive
        ep, shard = distributed.setup(config)  # (None, None) without expert parallelism
        self.model, self.model_config = load_model(config.model, dtype=config.dtype, device=config.device,
                                                   expert_cache=config.expert_cache,
                                                   expert_cache_gb=config.expert_cache_gb,
                                                   expert_policy=config.expert_policy, prepare=shard)
        self.expert_store = getattr(self.model, "expert_store", None)  # set when experts are offloaded
        self.prefetcher = self._make_prefetcher() if config.prefetch and self.expert_store is not None else None
        dtype = next(self.model.parameters()).dtype
        if torch.device(config.device).type == "cpu":
            with progress.stage("building the native CPU kernels"):  # cached: seconds only after a source change
                native_build.build_all(dtype)
            with progress.stage("packing the weights for the CPU"):
                self.model.pack_for_cpu()  # inference only from here: q/k/v fused; oneDNN-packed if no native kernel
        with progress.stage("loading the tokenizer"):  # the first transformers import alone takes seconds
            self.tokenizer = load_tokenizer(config.model)
        self.generation_defaults = generation_defaults(config.model, self.model_config)
        self.eos_token_ids = list(self.generation_defaults.get("eos_token_ids") or self.model_config.eos_token_id)
        num_blocks = ModelRunner.num_blocks_for_budget(self.model_config, config.block_size,
                                                        int(config.kv_cache_gb * 2**30), dtype)
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_gb={config.kv_cache_gb} holds no KV block "
                              f"({ModelRunner.bytes_per_block(self.model_config, config.block_size, dtype)} bytes each)")
        context = min(config.max_model_len or self.model_config.max_position_embeddings,
                      self.model_config.max_position_embeddings)
        # Never more blocks than max_num_seqs full-length sequences could hold: the rest would sit unused.
        num_blocks = min(num_blocks, config.max_num_seqs * -(-context // config.block_size))
        # A sequence must always fit in the cache on its own, or preemption could never make room for it.
        self.max_model_len = min(context, num_blocks * config.block_size)
        self.runner = ModelRunner(self.model, self.model_config, block_size=config.block_size,
                                  num_blocks=num_blocks, device=config.device, dtype=dtype)
        if ep is not None:  # ranks other than 0 follow rank 0's steps here and exit; rank 0 leads
            self.runner = distributed.lead_or_follow(self.runner, ep)
        self.scheduler = Scheduler(BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=max(config.max_num_batched_tokens, 1))
        self.sampler = Sampler()
        self.heap_trimmer = HeapTrimmer()  # else RSS grows with every new mix of request lengths
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        torch.manual_seed(config.seed)  # unseeded requests draw from the global generator
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _make_prefetcher(self):
        """The expert Prefetcher over the checkpoint's preferences (MAR buffers or a calibration file), installed."""
        from marserve.experts.preferences import load_preferences
        from marserve.experts.prefetcher import Prefetcher
        prefetcher = Prefetcher(self.model, load_preferences(self.config.model, self.model))
        prefetcher.install()
        return prefetcher

    # ---- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self.tokenize(prompt["prompt"])
        return None, list(prompt)

    def prepare(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and check a request without touching engine state (safe from any thread):
        (prompt text, prompt token ids), or RequestError."""
        text, ids = self.tokenize(prompt)
        self._check_prompt(ids, params)
        return text, ids

    def add_request(self, request_id: str, prompt, params: SamplingParams, arrival_time: float | None = None,
                    prepared: tuple[str | None, list[int]] | None = None) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        text, ids = prepared if prepared is not None else self.prepare(prompt, params)
        metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        # Everything that can fail comes first: a request is added whole or not at all.
        try:
            gens = [None if params.seed is None else torch.Generator().manual_seed(params.seed + j)
                    for j in range(params.n)]
        except (RuntimeError, OverflowError, TypeError, ValueError) as e:
            raise RequestError(f"seed {params.seed!r} is not usable: {e}", param="seed") from None
        seqs = [Sequence(next(self._seq_ids), request_id, list(ids), params, arrival_time=metrics.arrival_time)
                for _ in range(params.n)]
        req = _Request(request_id, text, ids, params, seqs, gens, metrics, logprobs=[[] for _ in seqs],
                       detokenizers=[IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                                     for _ in seqs])
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        # The length first: it costs nothing, and a token-id prompt can be a million ids long.
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                               f"tokens, and at least one must be left for the output",
                               param="prompt", code="context_length_exceeded")
        # Every token id a request carries indexes a [V] row somewhere in the step: one out of range
        # (or negative, which silently wraps to V - k) would fail or bend every sequence batched with it.
        self._check_token_ids(ids, "prompt")
        self._check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this "
                               f"model's context of {self.max_model_len} tokens",
                               param="max_tokens", code="context_length_exceeded")

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab:
                raise RequestError(f"{param}: token id {t!r} is outside the vocabulary [0, {vocab})", param=param)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                self.scheduler.finish(seq, "abort")

    def check_health(self) -> None:
        """Raise when the engine can no longer run a step (a rank of the expert-parallel group is gone)."""
        getattr(self.runner, "check_health", lambda: None)()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step for the whole batch; returns the outputs of the requests it advanced.

        A failure fails only the requests it belongs to: sampling and bookkeeping that fail for the
        batch are retried row by row, and a request's error text reaches that request alone."""
        out = self.scheduler.schedule()  # 1. schedule
        if out.is_empty:
            return []
        now = time.time()
        for seq in out.seqs:
            m = self.requests[seq.request_id].metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        if self.prefetcher is not None:  # 2. prefetch: ask for the experts this step is predicted to use
            try:
                self.prefetcher.before_step([list(c.token_ids) for c in out.chunks],
                                            [c.start_pos < len(s.prompt_token_ids) for s, c in zip(out.seqs, out.chunks)],
                                            [s.seq_id for s in out.seqs], [c.start_pos for c in out.chunks])
            except Exception:  # noqa: BLE001 - a prediction is advisory: a miss is read when needed
                logger.exception("the expert prefetcher failed before a step; running the step without it")
        try:
            logits = self.runner.execute(out.chunks)  # 3. execute
            self.scheduler.update(out)
        except distributed.RankFailure:
            raise  # a rank is gone: no later step can run either
        except Exception:  # noqa: BLE001 - one bad step must not take the engine down
            # One forward for the whole batch: nothing says whose input broke it, so every sequence
            # fails, and none is shown the exception's text (it may quote another request's data).
            logger.exception("engine step failed in the model; failing its %d sequences", len(out.seqs))
            for seq in out.seqs:
                self._fail(seq.request_id, "internal error during generation: the model step failed")
        else:
            self._record_prompt_logprobs(out)
            self._sample_and_check(out, logits)  # 4. sample, 5. update
        finally:
            if self.expert_store is not None:
                self.expert_store.end_pass()  # this thread's forward is over: its experts may be evicted
        touched = {s.request_id for s in out.seqs} | {s.request_id for s in out.preempted}
        outputs = [self._output(rid) for rid in touched if rid in self.requests]
        if any(o.finished for o in outputs):
            self.heap_trimmer.requests_finished()
        return outputs

    def _fail(self, request_id: str, message: str) -> None:
        """Finish every sequence of one request with an error its client alone sees."""
        req = self.requests.get(request_id)
        if req is None:
            return
        req.error = req.error or message
        for seq in req.seqs:
            self.scheduler.finish(seq, "error")

    def _fail_on_error(self, request_id: str, e: Exception, where: str) -> None:
        logger.error("request %s failed in %s", request_id, where, exc_info=e)
        self._fail(request_id, f"internal error during generation: {type(e).__name__}: {e}")

    def _record_prompt_logprobs(self, out: SchedulerOutput) -> None:
        for seq, chunk, logits in zip(out.seqs, out.chunks, self.runner.chunk_logits):
            if logits is None or seq.is_finished:
                continue
            try:
                self._record_chunk_prompt_logprobs(seq, chunk, logits)
            except Exception as e:  # noqa: BLE001 - fails this request only
                self._fail_on_error(seq.request_id, e, "prompt logprobs")

    def _record_chunk_prompt_logprobs(self, seq: Sequence, chunk, logits: torch.Tensor) -> None:
        """Row j of a chunk's logits predicts the token at start_pos + j + 1: a prompt token's logprob."""
        req = self.requests[seq.request_id]
        k = seq.params.prompt_logprobs
        prompt = seq.prompt_token_ids
        lp = logits.log_softmax(-1)  # [n, V]
        top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (None, None)
        for j in range(lp.shape[0]):
            pos = chunk.start_pos + j + 1
            if pos >= len(prompt) or pos in req.prompt_logprobs:
                continue  # past the prompt, or already recorded (n > 1, or recomputed after preemption)
            tok = prompt[pos]
            entry = {tok: Logprob(float(lp[j, tok]))}
            if k > 0:
                for r, (tid, v) in enumerate(zip(top_ids[j].tolist(), top_lp[j].tolist())):
                    entry.setdefault(tid, Logprob(v, rank=r + 1))
                if entry[tok].rank is None:
                    entry[tok].rank = int((lp[j] > lp[j, tok]).sum()) + 1
            req.prompt_logprobs[pos] = entry

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[tuple[SamplerOutput, int] | Exception]:
        """Per row: (the SamplerOutput holding it, its index there), or the exception sampling it raised.

        The whole batch at once; if that fails, row by row, so that only the rows that fail on their own
        fail (a batched failure says nothing of whose row broke it)."""
        def sample(idx: list[int]) -> SamplerOutput:
            seqs = [rows[i] for i in idx]
            reqs = [self.requests[s.request_id] for s in seqs]
            suppressed = [(self.eos_token_ids + list(s.params.stop_token_ids))
                          if len(s.output_token_ids) < s.params.min_tokens else [] for s in seqs]
            return self.sampler(logits if len(idx) == len(rows) else logits[idx], [s.params for s in seqs],
                                prompt_ids=[s.prompt_token_ids for s in seqs],
                                output_ids=[s.output_token_ids for s in seqs],
                                generators=[r.generators[r.seqs.index(s)] for r, s in zip(reqs, seqs)],
                                suppressed=suppressed)

        try:
            batch = sample(list(range(len(rows))))
            return [(batch, i) for i in range(len(rows))]
        except Exception:  # noqa: BLE001 - find the rows at fault
            logger.exception("sampling a batch of %d rows failed; sampling them one by one", len(rows))
        results: list[tuple[SamplerOutput, int] | Exception] = []
        for i in range(len(rows)):
            try:
                results.append((sample([i]), 0))
            except Exception as e:  # noqa: BLE001 - this row's own failure
                results.append(e)
        return results

    def _sample_and_check(self, out: SchedulerOutput, logits: torch.Tensor) -> None:
        rows = [seq for seq, chunk in zip(out.seqs, out.chunks) if chunk.needs_logits]
        keep = [i for i, s in enumerate(rows) if not s.is_finished]  # a request failed earlier in the step
        if not keep:
            return
        rows = [rows[i] for i in keep]
        logits = logits if len(keep) == logits.shape[0] else logits[keep]
        now = time.time()
        for seq, sampled in zip(rows, self._sample(logits, rows)):
            if seq.is_finished:
                continue  # another sequence of its request failed in this step
            if isinstance(sampled, Exception):
                self._fail_on_error(seq.request_id, sampled, "sampling")
                continue
            try:
                self._append_token(seq, *sampled, now)
            except Exception as e:  # noqa: BLE001 - fails this request only
                self._fail_on_error(seq.request_id, e, "its token's bookkeeping")

    def _append_token(self, seq: Sequence, sampled: SamplerOutput, i: int, now: float) -> None:
        req = self.requests[seq.request_id]
        tok = sampled.token_ids[i]
        seq.output_token_ids.append(tok)
        self.generation_tokens_total += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        elif m.last_token_time is not None:
            m.inter_token_latencies.append(now - m.last_token_time)
        m.last_token_time = now
        if seq.params.logprobs is not None:
            entry = {tok: Logprob(float(sampled.logprobs[i]))}
            for r, (tid, lp) in enumerate(zip(sampled.top_ids[i, :seq.params.logprobs].tolist(),
                                              sampled.top_logprobs[i, :seq.params.logprobs].tolist())):
                entry[tid] = Logprob(lp, rank=r + 1)
            req.logprobs[req.seqs.index(seq)].append(entry)
        detok = req.detokenizers[req.seqs.index(seq)]
        self._check_stop(seq, tok, detok, detok.add(tok))
        if req.finished:
            m.finished_time = now

    def _check_stop(self, seq: Sequence, tok: int, detok: IncrementalDetokenizer, new_text: str) -> None:
        p = seq.params
        n = len(seq.output_token_ids)
        if n >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                return self.scheduler.finish(seq, "stop")
            if tok in p.stop_token_ids:
                return self.scheduler.finish(seq, "stop", tok)
            if p.stop and new_text:
                # Only the new text, plus enough before it for a stop string that straddles the boundary.
                start = max(0, len(detok.text) - len(new_text) - max(len(s) for s in p.stop) + 1)
                found = [(i, s) for s in p.stop if (i := detok.text.find(s, start)) >= 0]
                if found:
                    at, hit = min(found)
                    detok.text = detok.text[:at + (len(hit) if p.include_stop_str_in_output else 0)]
                    return self.scheduler.finish(seq, "stop", hit)
        if (p.max_tokens is not None and n >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            detok.flush()
            self.scheduler.finish(seq, "length")

    # ---- outputs --------------------------------------------------------------------------------

    def _output(self, request_id: str) -> RequestOutput:
        req = self.requests[request_id]
        outs = []
        for j, seq in enumerate(req.seqs):
            p = seq.params
            detok = req.detokenizers[j]
            if seq.is_finished and not isinstance(seq.stop_reason, str):
                detok.flush()  # a stop string's cut text stays cut
            text = detok.text
            outs.append(CompletionOutput(index=j, text=text, token_ids=list(seq.output_token_ids),
                                         finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                         logprobs=req.logprobs[j] if p.logprobs is not None else None))
        finished = req.finished
        if finished:
            del self.requests[request_id]
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [req.prompt_logprobs.get(i) for i in range(1, len(req.prompt_token_ids))]
        return RequestOutput(request_id=request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=outs, finished=finished, metrics=req.metrics, prompt_logprobs=prompt_logprobs,
                             num_cached_tokens=req.seqs[0].num_cached_tokens, error=req.error)
