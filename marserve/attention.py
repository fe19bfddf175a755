"""Attention over the tokens of one forward pass: dense (no cache) or paged (KV cache in blocks).

Model files call `attend()` and never look at how K/V are stored.
Legend: T=tokens in this forward pass (all sequences concatenated), B=sequences,
Hq=query heads, Hkv=key/value heads, D=head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """How the T tokens of a forward pass split into sequences, and where their K/V live."""

    query_lens: list[int]  # new tokens of each sequence in this pass, in concatenation order
    context_lens: list[int]  # tokens of each sequence already cached before this pass
    # Paged KV cache (None = dense attention over just the tokens of this pass):
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (k, v) [N_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor | None = None  # [B, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor | None = None  # [T] int64, cache slot written by each new token

    @classmethod
    def dense(cls, query_lens: list[int]) -> "AttentionMetadata":
        """Each sequence is whole in this pass (prefill, training, reference tests)."""
        return cls(query_lens=list(query_lens), context_lens=[0] * len(query_lens))

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_paged(self) -> bool:
        return self.kv_caches is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
           layer_idx: int, scale: float) -> torch.Tensor:
    """Causal attention. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    if meta.is_paged:
        return _paged_attend(q, k, v, meta, layer_idx, scale)
    return _dense_attend(q, k, v, meta.query_lens, scale)


def _dense_attend(q, k, v, query_lens: list[int], scale: float) -> torch.Tensor:
    if len(set(query_lens)) == 1:
        # Equal lengths: one batched SDPA call over [B, H, L, D].
        B, L = len(query_lens), query_lens[0]
        qb, kb, vb = (x.view(B, L, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)
    outs = []
    for qs, ks, vs in zip(q.split(query_lens), k.split(query_lens), v.split(query_lens)):
        o = F.scaled_dot_product_attention(qs.transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0),
                                           vs.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
                                           enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, 0)


def _paged_attend(q, k, v, meta: AttentionMetadata, layer_idx: int, scale: float) -> torch.Tensor:
    # Owned by the engine: write k/v to their slots, then attend over each sequence's blocks.
    raise NotImplementedError("paged attention is provided by the engine (issue: Engine)")
