"""Owns the paged KV cache's blocks: a fixed pool, per-sequence block tables, prefix caching.

A block holds `block_size` consecutive tokens of one sequence. A full block is identified by a hash
chained over the previous block's hash and its own token ids, so two sequences with the same prefix
share the same physical blocks (reference counted). A block whose last user leaves keeps its
contents and hash as long as it can: it is evicted least-recently-freed first, only when a new
block is needed and no never-used block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered for prefix sharing
    token_ids: tuple[int, ...] = ()  # contents of a hashed block, checked on every hit (hash collisions)


@dataclass
class Allocation:
    block_table: list[int]
    num_cached_tokens: int  # leading prompt tokens whose K/V are already in the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._never_used: deque[int] = deque(range(num_blocks))  # free blocks holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free hashed blocks, least recently freed first
        self._by_hash: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of those, found in the cache

    # ---- capacity -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._never_used) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of blocks held by running sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- sequences ------------------------------------------------------------------------------

    def can_allocate(self, token_ids: list[int]) -> bool:
        hits_in_use, _ = self._count_prefix_hits(token_ids)
        return self.blocks_needed(len(token_ids)) - hits_in_use <= self.num_free_blocks

    def allocate(self, token_ids: list[int], use_cache: bool = True) -> Allocation:
        """Blocks for a new sequence's prompt, reusing cached full blocks of the same prefix (if use_cache)."""
        if not self.can_allocate(token_ids):
            raise MemoryError(f"not enough free KV blocks for {len(token_ids)} tokens")
        table: list[int] = []
        num_cached = 0
        prev_hash = None
        missed = False
        for start in range(0, len(token_ids), self.block_size):
            chunk = tuple(token_ids[start:start + self.block_size])
            full = len(chunk) == self.block_size
            block_id = None
            if full and self.enable_prefix_caching:
                h = hash((prev_hash, chunk))
                prev_hash = h
                self.prefix_queries += int(use_cache)
                if not missed and use_cache:
                    block_id = self._lookup(h, chunk)
                if block_id is not None:
                    self.prefix_hits += 1
                    self._take(block_id)
                    num_cached += self.block_size
                else:
                    # Registered only once its K/V are computed (mark_computed), never before:
                    # another sequence must not "hit" a block that holds nothing yet.
                    missed = True
                    block_id = self._new_block()
            else:
                missed = True
                block_id = self._new_block()
            table.append(block_id)
        # The last prompt token is always recomputed: its logits are needed to sample the first output.
        num_cached = min(num_cached, len(token_ids) - 1) if token_ids else 0
        return Allocation(table, max(num_cached, 0))

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the sequence can grow to `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(block_table) <= self.num_free_blocks

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> None:
        """Grow the table so the sequence can hold `num_tokens` tokens."""
        if not self.can_append(block_table, num_tokens):
            raise MemoryError(f"not enough free KV blocks to grow to {num_tokens} tokens")
        while len(block_table) < self.blocks_needed(num_tokens):
            block_table.append(self._new_block())

    def mark_computed(self, block_table: list[int], token_ids: list[int], num_computed: int) -> None:
        """Register the full blocks among the first `num_computed` tokens (their K/V now written)
        for prefix sharing."""
        if not self.enable_prefix_caching:
            return
        prev_hash = None
        for i in range(min(num_computed // self.block_size, len(block_table))):
            chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            prev_hash = hash((prev_hash, chunk))
            if self._blocks[block_table[i]].hash is None:
                self._register(block_table[i], prev_hash, chunk)

    def free(self, block_table: list[int]) -> None:
        """Release a finished, aborted or preempted sequence's blocks (last block first, so the
        prefix blocks, the most shareable, are evicted last)."""
        for block_id in reversed(block_table):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"KV block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._never_used.append(block_id)
        block_table.clear()

    # ---- internals ------------------------------------------------------------------------------

    def _count_prefix_hits(self, token_ids: list[int]) -> tuple[int, int]:
        """(hits on blocks in use, hits on free cached blocks) for this prompt's leading full blocks."""
        if not self.enable_prefix_caching:
            return 0, 0
        in_use = free = 0
        prev_hash = None
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            chunk = tuple(token_ids[start:start + self.block_size])
            prev_hash = hash((prev_hash, chunk))
            block_id = self._lookup(prev_hash, chunk)
            if block_id is None:
                break
            if self._blocks[block_id].ref_count > 0:
                in_use += 1
            else:
                free += 1
        return in_use, free

    def _lookup(self, h: int, chunk: tuple[int, ...]) -> int | None:
        block_id = self._by_hash.get(h)
        if block_id is None or self._blocks[block_id].token_ids != chunk:
            return None
        return block_id

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _new_block(self) -> int:
        if self._never_used:
            block_id = self._never_used.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            old = self._blocks[block_id]
            del self._by_hash[old.hash]
            old.hash, old.token_ids = None, ()
        else:
            raise MemoryError("no free KV block")
        self._blocks[block_id].ref_count = 1
        return block_id

    def _register(self, block_id: int, h: int, chunk: tuple[int, ...]) -> None:
        if h in self._by_hash:
            return
        block = self._blocks[block_id]
        block.hash, block.token_ids = h, chunk
        self._by_hash[h] = block_id
