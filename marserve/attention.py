"""Attention over the tokens of one forward pass: dense (no cache) or paged (KV cache in blocks).

Model files call `attend()` and never look at how K/V are stored.
Legend: T=tokens in this forward pass (all sequences concatenated), B=sequences,
Hq=query heads, Hkv=key/value heads, D=head dim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from marserve_kernels import cpu_attention_native
from marserve_kernels.reference import apply_rope


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
           layer_idx: int, scale: float, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    rotary=(cos, sin) [T, D]: q and k arrive unrotated and get the rotary embedding here, so that the CPU
    decode path can fuse it with the cache write and the attention itself (one native call per layer)."""
    if rotary is not None and meta.is_paged and _native_decode_applies(q, meta, layer_idx):
        return _native_decode(q, k, v, rotary, meta, layer_idx, scale)
    if rotary is not None:
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
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


BACKENDS = ("triton", "native", "torch")


def forced_backend() -> str | None:
    forced = os.environ.get("MARSERVE_ATTENTION_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"MARSERVE_ATTENTION_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
    return forced or None


def _use_triton(q: torch.Tensor) -> bool:
    forced = forced_backend()
    return forced == "triton" if forced else q.device.type == "cuda"


def _native_decode_applies(q: torch.Tensor, meta: AttentionMetadata, layer_idx: int) -> bool:
    """CPU decode (one new token per sequence) with marserve_kernels' native fused kernel available.
    Decided at the first layer of a pass and kept on the metadata (every layer has the same answer)."""
    ok = meta.__dict__.get("_native_ok")
    if ok is None:
        ok = meta.__dict__["_native_ok"] = _native_decode_possible(q, meta, layer_idx)
    return ok


def _native_decode_possible(q: torch.Tensor, meta: AttentionMetadata, layer_idx: int) -> bool:
    if forced_backend() not in (None, "native") or q.device.type != "cpu" or q.requires_grad:
        return False
    if any(n != 1 for n in meta.query_lens):
        return False
    return cpu_attention_native.supports(q, meta.kv_caches[layer_idx][0])


def _native_decode(q, k, v, rotary, meta: AttentionMetadata, layer_idx: int, scale: float) -> torch.Tensor:
    """RoPE, cache write and paged attention in one native call (marserve_kernels/cpu_decode_attention.c)."""
    k_cache, v_cache = meta.kv_caches[layer_idx]
    plan = meta.__dict__.get("_native_plan")
    if plan is None or plan.rotary is not rotary[0]:  # the same for every layer of the pass
        plan = meta.__dict__["_native_plan"] = cpu_attention_native.DecodePlan(
            rotary[0], rotary[1], meta.block_tables, [n + 1 for n in meta.context_lens],
            meta.slot_mapping, q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], scale, k_cache.dtype)
    return plan.run(q, k, v, k_cache, v_cache)


def _triton_paged_attend(q, k, v, meta: AttentionMetadata, layer_idx: int, scale: float) -> torch.Tensor:
    """GPU: marserve_kernels' Triton paged attention (also runs on CPU under TRITON_INTERPRET=1, for tests)."""
    from marserve_kernels.paged_attention import paged_attention_decode, paged_attention_prefill, write_kv_cache
    k_cache, v_cache = meta.kv_caches[layer_idx]
    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    plan = meta.__dict__.get("_triton_plan")
    if plan is None:  # the same for every layer of the pass
        lens = torch.tensor(meta.query_lens, dtype=torch.int32, device=q.device)
        starts = torch.zeros(len(meta.query_lens) + 1, dtype=torch.int32, device=q.device)
        starts[1:] = torch.cumsum(lens, 0)
        totals = torch.tensor(meta.context_lens, dtype=torch.int32, device=q.device) + lens
        plan = meta.__dict__["_triton_plan"] = (starts, totals)
    starts, totals = plan
    if all(n == 1 for n in meta.query_lens):
        return paged_attention_decode(q, k_cache, v_cache, meta.block_tables, totals, scale)
    return paged_attention_prefill(q, k_cache, v_cache, meta.block_tables, starts, totals, scale,
                                   max_query_len=max(meta.query_lens))  # known on the host: no device read


def _paged_attend(q, k, v, meta: AttentionMetadata, layer_idx: int, scale: float) -> torch.Tensor:
    """Write this pass's k/v into their cache slots, then attend each sequence over its blocks."""
    if _use_triton(q):
        return _triton_paged_attend(q, k, v, meta, layer_idx, scale)
    k_cache, v_cache = meta.kv_caches[layer_idx]  # [N_blocks, block_size, Hkv, D]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if all(n == 1 for n in meta.query_lens):
        return _paged_decode(q, k_cache, v_cache, meta, scale)
    block_size = k_cache.shape[1]
    outs = []
    for i, (q_seq, n_new, n_cached) in enumerate(zip(q.split(meta.query_lens), meta.query_lens, meta.context_lens)):
        total = n_cached + n_new
        blocks = meta.block_tables[i, :-(-total // block_size)]
        keys = k_cache.index_select(0, blocks).flatten(0, 1)[:total]  # [L, Hkv, D]
        values = v_cache.index_select(0, blocks).flatten(0, 1)[:total]
        # Query j of this chunk sits at position n_cached + j and sees keys up to that position.
        visible = (torch.arange(total, device=q.device)[None, :]
                   <= (n_cached + torch.arange(n_new, device=q.device))[:, None])  # [n_new, L]
        o = F.scaled_dot_product_attention(q_seq.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                                           values.transpose(0, 1).unsqueeze(0), attn_mask=visible, scale=scale,
                                           enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, 0)


def _decode_plan(meta: AttentionMetadata, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids to gather [B * nb], visibility mask [B, 1, 1, nb * block_size]); the same for every
    layer of the pass, so built once and kept on the metadata."""
    plan = meta.__dict__.get("_decode_plan")
    if plan is None:
        totals = torch.tensor(meta.context_lens, device=device) + 1  # [B]
        max_blocks = -(-int(totals.max()) // block_size)
        tables = meta.block_tables[:, :max_blocks]  # [B, nb]; entries past a sequence's end are masked out
        visible = torch.arange(max_blocks * block_size, device=device)[None, :] < totals[:, None]  # [B, L]
        plan = (tables.reshape(-1), visible[:, None, None, :])
        meta.__dict__["_decode_plan"] = plan
    return plan


def _paged_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences decode one token: one padded, masked SDPA call for the whole batch."""
    block_size = k_cache.shape[1]
    flat, visible = _decode_plan(meta, block_size, q.device)
    B, L = q.shape[0], visible.shape[-1]
    # index_select on whole blocks is several times faster than advanced indexing with a 2-D index
    keys = k_cache.index_select(0, flat).view(B, L, *k_cache.shape[2:])  # [B, L, Hkv, D]
    values = v_cache.index_select(0, flat).view(B, L, *v_cache.shape[2:])
    if B == 1:  # one sequence: cut the padding off instead of masking it (SDPA's unmasked path is faster)
        n = meta.context_lens[0] + 1
        keys, values, visible = keys[:, :n], values[:, :n], None
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                       attn_mask=visible, scale=scale, enable_gqa=True)
    return o.squeeze(2)  # [B, Hq, D] == [T, Hq, D]
