"""Decides, each step, which sequences run and how many of their tokens: continuous batching with
a token budget, chunked prefill, and preemption by recompute when KV blocks run out.

Order of a step: running sequences first (decodes and unfinished prefill chunks, oldest first), then
waiting sequences in arrival order while budget, sequence slots and blocks allow. Admission is strictly
FIFO, so a long prompt at the head of the queue is never starved by shorter ones behind it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from marserve.engine.block_manager import BlockManager
from marserve.engine.model_runner import ScheduledChunk
from marserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)  # chunks[i] belongs to seqs[i]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.block_manager.blocks_needed(seq.num_tokens + 1) > self.block_manager.num_blocks:
            raise ValueError(f"sequence of {seq.num_tokens} tokens can never fit in the KV cache "
                             f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size})")
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. Running sequences: one decode token each, or the next chunk of an unfinished prefill.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_append(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]  # preempt the newest; it may be this very sequence
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted itself: nothing after it in `running` is left either
            self.block_manager.ensure_capacity(seq.block_table, seq.num_computed_tokens + n)
            self._add_chunk(out, seq, n)
            budget -= n
            i += 1
        # 2. Waiting sequences, strictly in order.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq.token_ids):
                break
            self.waiting.popleft()
            # Prompt logprobs need logits at every prompt position: cached blocks would skip them.
            alloc = self.block_manager.allocate(seq.token_ids, use_cache=seq.params.prompt_logprobs is None)
            seq.block_table = alloc.block_table
            seq.num_computed_tokens = alloc.num_cached_tokens
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = alloc.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self._add_chunk(out, seq, n)
            budget -= n
        return out

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        out.seqs.append(seq)
        out.chunks.append(ScheduledChunk(token_ids=seq.token_ids[start:start + n], start_pos=start,
                                         block_table=seq.block_table, needs_logits=start + n == seq.num_tokens,
                                         all_logits=(seq.params.prompt_logprobs is not None
                                                     and start + 1 < len(seq.prompt_token_ids))))

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute later: free the blocks, back to the front of the queue."""
        self.running.remove(seq)
        if seq in out.seqs:  # already given a chunk this step: withdraw it
            k = out.seqs.index(seq)
            del out.seqs[k], out.chunks[k]
        self.block_manager.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: record the computed tokens and register full blocks for prefix sharing."""
        for seq, chunk in zip(out.seqs, out.chunks):
            seq.num_computed_tokens += len(chunk.token_ids)
            self.block_manager.mark_computed(seq.block_table, seq.token_ids, seq.num_computed_tokens)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Finished, aborted or failed: the sequence leaves and its blocks come back at once."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
