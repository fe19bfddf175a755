"""Runs the model on one scheduled step: builds the flat batch and paged-attention metadata, owns the KV cache.

Legend: T=tokens in the step, B=sequences, L=layers, Hkv=key/value heads, D=head dim, V=vocabulary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from marserve import hugepages
from marserve.attention import AttentionMetadata
from marserve.config import ModelConfig


@dataclass
class ScheduledChunk:
    token_ids: list[int]  # tokens whose K/V are computed this step: a prefill chunk, or 1 decode token
    start_pos: int  # position of token_ids[0] == tokens of this sequence already in the KV cache
    block_table: list[int]  # KV block ids of the sequence, covering start_pos + len(token_ids) tokens
    needs_logits: bool  # True when the next-token distribution after the last token is wanted
    all_logits: bool = False  # also keep the logits of every position (prompt logprobs), in `chunk_logits`


class ModelRunner:
    def __init__(self, model, model_config: ModelConfig, *, block_size: int, num_blocks: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise kv_cache_gb")
        self.model = model
        self.config = model_config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.chunk_logits: list[torch.Tensor | None] = []  # set by execute() for chunks with all_logits
        shape = (num_blocks, block_size, model_config.num_key_value_heads, model_config.head_dim)
        self.kv_caches = [(hugepages.empty(shape, dtype, self.device).zero_(),
                           hugepages.empty(shape, dtype, self.device).zero_())
                          for _ in range(model_config.num_hidden_layers)]

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        # K and V, every layer, every token of the block.
        return 2 * model_config.num_hidden_layers * block_size * model_config.num_key_value_heads \
            * model_config.head_dim * elem

    @staticmethod
    def num_blocks_for_budget(model_config: ModelConfig, block_size: int, kv_cache_bytes: int,
                              dtype: torch.dtype) -> int:
        return int(kv_cache_bytes // ModelRunner.bytes_per_block(model_config, block_size, dtype))

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Float32 logits [number of chunks with needs_logits, V], in chunk order."""
        bs = self.block_size
        token_ids = [t for c in chunks for t in c.token_ids]
        positions = [p for c in chunks for p in range(c.start_pos, c.start_pos + len(c.token_ids))]
        slots = [c.block_table[p // bs] * bs + p % bs
                 for c in chunks for p in range(c.start_pos, c.start_pos + len(c.token_ids))]
        width = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]  # padding is masked out
        query_lens = [len(c.token_ids) for c in chunks]
        meta = AttentionMetadata(
            query_lens=query_lens,
            context_lens=[c.start_pos for c in chunks],
            kv_caches=self.kv_caches,
            block_tables=torch.tensor(tables, dtype=torch.int64, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
        )
        hidden = self.model(torch.tensor(token_ids, device=self.device),
                            torch.tensor(positions, device=self.device), meta)  # [T, H]
        ends = list(itertools.accumulate(query_lens))
        # Logits of whole chunks, for prompt logprobs: [len(token_ids), V] per chunk that asked, else None.
        self.chunk_logits = [self.model.compute_logits(hidden[end - n:end]).float() if c.all_logits else None
                             for end, n, c in zip(ends, query_lens, chunks)]
        rows = [end - 1 for end, c in zip(ends, chunks) if c.needs_logits]
        if not rows:
            return hidden.new_zeros(0, self.config.vocab_size, dtype=torch.float32)
        if len(rows) < hidden.shape[0]:  # (decode: every row is a last token, no gather)
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self.model.compute_logits(hidden).float()
