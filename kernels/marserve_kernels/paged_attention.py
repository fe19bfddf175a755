"""Attention over a paged KV cache in Triton (GPU; on CPU only under TRITON_INTERPRET=1), with torch references.

Cache layout (marserve/attention.py): per layer k_cache, v_cache [N_blocks, block_size, Hkv, D];
token j of a sequence lives in block block_tables[s, j // block_size] at offset j % block_size.
- write_kv_cache: each new token's k/v into its slot (slot = block * block_size + offset).
- paged_attention_decode: one query per sequence over its whole cached context; with partition_size,
  split-K (flash-decoding): partitions of the context in parallel programs, merged by a reduction kernel.
- paged_attention_prefill: a chunk of new queries per sequence (positions context - new .. context - 1),
  causal over the cached prefix and the chunk itself: chunked prefill and prefix-cache hits.
Both stream the sequence's KV blocks with an online softmax (running max and sum, fp32), GQA by
mapping query head h to KV head h // (Hq / Hkv). Legend: B sequences, T new tokens, Hq/Hkv heads,
D head dim, S block size.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ---- torch references ----------------------------------------------------------------------------

def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    blocks = -(-length // cache.shape[1])
    return cache[table[:blocks].long()].flatten(0, 1)[:length]  # [L, Hkv, D]


def _attend(q, k, v, visible, scale):
    """q [n, Hq, D], k/v [L, Hkv, D], visible [n, L] -> [n, Hq, D] (fp32 math)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0  # negative slots are padding tokens
    k_cache.view(-1, Hkv, D)[slot_mapping[keep].long()] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, Hkv, D)[slot_mapping[keep].long()] = v[keep].to(v_cache.dtype)


def paged_attention_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        L = int(context_lens[s])
        k, v = _gather(k_cache, block_tables[s], L), _gather(v_cache, block_tables[s], L)
        out[s] = _attend(q[s:s + 1], k, v, torch.ones(1, L, dtype=torch.bool, device=q.device), scale)[0]
    return out


def paged_attention_prefill_reference(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                      scale) -> torch.Tensor:
    out = torch.empty_like(q)
    for s in range(block_tables.shape[0]):
        a, b = int(query_start_loc[s]), int(query_start_loc[s + 1])
        L, n = int(context_lens[s]), b - a
        k, v = _gather(k_cache, block_tables[s], L), _gather(v_cache, block_tables[s], L)
        q_pos = torch.arange(L - n, L, device=q.device)
        visible = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]
        out[a:b] = _attend(q[a:b], k, v, visible, scale)
    return out


# ---- Triton --------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, row: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = (offs < row) & (offs * 0 + slot >= 0)  # a negative slot marks a padding token: nothing is written
        tl.store(kc_ptr + slot * row + offs, tl.load(k_ptr + t * row + offs, mask=m), mask=m)
        tl.store(vc_ptr + slot * row + offs, tl.load(v_ptr + t * row + offs, mask=m), mask=m)

    @triton.jit
    def _paged_attn_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, tables_ptr, qstart_ptr, ctx_ptr, scale,
                           max_blocks, Hq: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                           HEADS: tl.constexpr = 1, BLOCK_H: tl.constexpr = 1,
                           USE_DOT: tl.constexpr = False, DOT_FP32: tl.constexpr = False):
        """One program: BLOCK_Q queries of one sequence times HEADS query heads sharing one KV head
        (HEADS = 1: one query head; HEADS = Hq / Hkv: the whole group, so each K/V tile is loaded once
        for it). Its rows are (query, head) pairs, BLOCK_H (HEADS padded to a power of two) per query.
        Decode is BLOCK_Q = 1, n = 1. USE_DOT (every tile side >= 16): the two products as tl.dot
        (tensor cores on a GPU) instead of broadcast-and-sum; DOT_FP32: their operands in fp32 (fp32
        inputs, or bf16 under the interpreter)."""
        seq, head_group, qblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_first = tl.load(qstart_ptr + seq)
        n_new = tl.load(qstart_ptr + seq + 1) - q_first
        if qblock * BLOCK_Q >= n_new:
            return
        L = tl.load(ctx_ptr + seq)  # tokens in the cache for this sequence, the new ones included
        kv_head = head_group * HEADS // (Hq // Hkv)
        r = tl.arange(0, BLOCK_Q * BLOCK_H)  # rows: (query, head) pairs
        qi = qblock * BLOCK_Q + r // BLOCK_H  # query index within the chunk
        head = head_group * HEADS + r % BLOCK_H
        q_ok = (qi < n_new) & (r % BLOCK_H < HEADS)
        q_pos = L - n_new + qi  # absolute positions of the queries
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        row_off = ((q_first + qi) * Hq + head)[:, None] * D + d[None, :]  # [BM, BD]
        q = tl.load(q_ptr + row_off, mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        if not USE_DOT or DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_Q * BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_Q * BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_Q * BLOCK_H, BLOCK_D), tl.float32)
        last = tl.max(tl.where(q_ok, q_pos, 0), 0)  # keys beyond the last query's position are never seen
        s_off = tl.arange(0, BLOCK_S)
        for b in range(tl.cdiv(last + 1, S)):
            block = tl.load(tables_ptr + seq * max_blocks + b).to(tl.int64)
            k_pos = b * S + s_off  # [BS]
            k_ok = (s_off < S) & (k_pos < L)
            base = ((block * S + s_off)[:, None] * Hkv + kv_head) * D + d[None, :]
            k = tl.load(kc_ptr + base, mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BS, BD]
            v = tl.load(vc_ptr + base, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if USE_DOT:
                if DOT_FP32:  # "ieee": fp32 inputs must not be rounded to tf32
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(k))  # fp16/bf16 operands, fp32 accumulation
            else:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                scores = tl.sum(q[:, None, :] * k[None, :, :], 2)
            scores = scores * scale  # [BM, BS]
            visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & q_ok[:, None]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_DOT:
                if DOT_FP32:
                    pv = tl.dot(p, v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :], 1)  # [BM, BD]
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + row_off, out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_partition_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                                 tables_ptr, ctx_ptr, scale, max_blocks, num_parts,
                                 Hq: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                                 BLOCKS_PER_PART: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_S: tl.constexpr, IS_SINGLE: tl.constexpr):
        """One program: one sequence, one KV head with all its G = Hq / Hkv query heads (each K/V tile is
        read once for the group), one partition of BLOCKS_PER_PART cache blocks. IS_SINGLE (one partition
        covers every context): write the output; otherwise the partition's (max, sum, unnormalised acc)."""
        seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        L = tl.load(ctx_ptr + seq)
        first = part * BLOCKS_PER_PART
        end = tl.minimum(first + BLOCKS_PER_PART, tl.cdiv(L, S))
        G: tl.constexpr = Hq // Hkv
        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        # Empty when the sequence ends before this partition: nothing is stored, the reduction skips it.
        g_used = g_ok & (g * 0 + first * S < L)
        heads = kv_head * G + g  # [BG] query heads served by this KV head
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + (seq * Hq + heads)[:, None] * D + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BG, BD]
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        s_off = tl.arange(0, BLOCK_S)
        for b in range(first, end):
            block = tl.load(tables_ptr + seq * max_blocks + b).to(tl.int64)
            k_ok = (s_off < S) & (b * S + s_off < L)
            base = ((block * S + s_off)[:, None] * Hkv + kv_head) * D + d[None, :]
            k = tl.load(kc_ptr + base, mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BS, BD]
            v = tl.load(vc_ptr + base, mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], 2) * scale  # [BG, BS]
            scores = tl.where(k_ok[None, :], scores, float("-inf"))
            # Every block in range holds at least one key (b < cdiv(L, S)), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
            m_i = m_new
        row = seq * Hq + heads  # [BG]
        if IS_SINGLE:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty context gives zeros
            tl.store(out_ptr + row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
        else:
            tl.store(part_m_ptr + row * num_parts + part, m_i, mask=g_used)
            tl.store(part_l_ptr + row * num_parts + part, l_i, mask=g_used)
            tl.store(part_acc_ptr + (row * num_parts + part)[:, None] * D + d[None, :], acc,
                     mask=g_used[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_reduce_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, ctx_ptr, num_parts,
                              Hq: tl.constexpr, PART_TOKENS: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        """One program per (sequence, query head): rescale each partition to the global max and sum."""
        row = tl.program_id(0)  # seq * Hq + head
        seq = row // Hq
        L = tl.load(ctx_ptr + seq)
        p = tl.arange(0, BLOCK_P)
        p_ok = p < tl.cdiv(L, PART_TOKENS)  # partitions past the sequence's end were never written
        m = tl.load(part_m_ptr + row * num_parts + p, mask=p_ok, other=float("-inf"))  # [BP]
        l = tl.load(part_l_ptr + row * num_parts + p, mask=p_ok, other=0.0)
        m_all = tl.max(m, 0)
        w = tl.where(p_ok, tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all)), 0.0)  # [BP]
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        acc = tl.load(part_acc_ptr + (row * num_parts + p)[:, None] * D + d[None, :],
                      mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # [BP, BD]
        total = tl.sum(w * l, 0)
        out = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _as_index(x: torch.Tensor) -> torch.Tensor:
    """int32 and int64 index tensors go to the kernels as they are: a cast would be one more device
    copy per layer (the model runner builds int64 block tables)."""
    return (x if x.dtype in (torch.int32, torch.int64) else x.to(torch.int32)).contiguous()


def _need_triton():
    if triton is None:
        raise RuntimeError("Triton is not installed; use the *_reference functions or marserve.attention")


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k/v [T, Hkv, D] into their slots of k_cache/v_cache [N, S, Hkv, D]; tokens whose slot is negative
    (padding, e.g. a batch padded to a captured CUDA-graph size) are skipped."""
    _need_triton()
    T = k.shape[0]
    if T == 0:
        return
    row = k_cache.shape[2] * k_cache.shape[3]
    _write_kv_kernel[(T,)](k.to(k_cache.dtype).contiguous(), v.to(v_cache.dtype).contiguous(), k_cache, v_cache,
                           slot_mapping.contiguous(), row=row, BLOCK=triton.next_power_of_2(row))


def _launch(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, block_q, max_q,
            group_heads=False):
    B = block_tables.shape[0]
    Hq, D = q.shape[1], q.shape[2]
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    out = torch.empty_like(q)
    tables = _as_index(block_tables)
    heads = Hq // Hkv if group_heads else 1
    block_h = triton.next_power_of_2(heads)
    block_d, block_s = triton.next_power_of_2(D), triton.next_power_of_2(S)
    use_dot = min(block_q * block_h, block_d, block_s) >= 16  # tl.dot's smallest tile side
    if not use_dot:
        # Broadcast-and-sum holds a [rows, block, D] product: keep rows at block_q, as with one head.
        block_q = max(1, block_q // block_h)
    grid = (B, Hq // heads, triton.cdiv(max(max_q, 1), block_q))
    # Triton's interpreter computes bf16 tl.dot wrongly (see docs/kernels.md): fp32 operands there.
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    _paged_attn_kernel[grid](q.contiguous(), k_cache, v_cache, out, tables, _as_index(query_start_loc),
                             _as_index(context_lens), float(scale), tables.shape[1], Hq=Hq, Hkv=Hkv, D=D, S=S,
                             BLOCK_Q=block_q, BLOCK_D=block_d, BLOCK_S=block_s, HEADS=heads, BLOCK_H=block_h,
                             USE_DOT=use_dot, DOT_FP32=dot_fp32)
    return out


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                           partition_size: int | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one new token per sequence, already in the cache) -> [B, Hq, D].

    partition_size (tokens, a multiple of the block size) selects the split-K path: each sequence's
    context is cut into partitions attended by separate programs, then merged by a reduction kernel,
    so a few long sequences still fill the GPU. None: one program per (sequence, query head)."""
    _need_triton()
    if partition_size is not None:
        return _decode_split(q, k_cache, v_cache, block_tables, context_lens, scale, partition_size)
    B = q.shape[0]
    starts = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    return _launch(q, k_cache, v_cache, block_tables, starts, context_lens, scale, block_q=1, max_q=1)


def paged_attention_prefill(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                            block_q: int = 16, max_query_len: int | None = None,
                            group_heads: bool = True) -> torch.Tensor:
    """q [T, Hq, D]: sequence s's new tokens are q[query_start_loc[s]:query_start_loc[s+1]], the last of
    its context_lens[s] cached tokens (written already) -> [T, Hq, D], causal.

    block_q queries per program; group_heads: a program takes them for all Hq / Hkv query heads of one
    KV head (rows = block_q * heads), so K/V are read once per group instead of once per query head.

    max_query_len (the longest chunk), when the caller knows it on the host, sizes the grid without
    reading query_start_loc back from the device (a sync per layer on a GPU)."""
    _need_triton()
    if max_query_len is not None:
        max_q = max_query_len
    else:
        max_q = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if block_tables.shape[0] else 0
    return _launch(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, block_q, max_q,
                   group_heads)


def _decode_split(q, k_cache, v_cache, block_tables, context_lens, scale, partition_size: int) -> torch.Tensor:
    """Split-K decode (flash-decoding): programs over (sequence, KV head, partition), then a merge."""
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if partition_size <= 0 or partition_size % S:
        raise ValueError(f"partition_size={partition_size} must be a positive multiple of the block size {S}")
    out = torch.empty_like(q)
    if B == 0:
        return out
    blocks_per_part = partition_size // S
    tables = _as_index(block_tables)
    # The table width bounds every context, so the partition count needs no device-to-host sync.
    num_parts = triton.cdiv(tables.shape[1], blocks_per_part)
    q, ctx = q.contiguous(), _as_index(context_lens)
    single = num_parts == 1
    # fp32 partials: per (sequence, query head, partition) the running max, the sum and the unnormalised acc.
    part_m = part_l = part_acc = out  # unused placeholders when one partition covers everything
    if not single:
        part_m = torch.empty(B, Hq, num_parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, Hq, num_parts, D, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(D)
    _decode_partition_kernel[(B, Hkv, num_parts)](
        q, k_cache, v_cache, out, part_m, part_l, part_acc, tables, ctx, float(scale), tables.shape[1], num_parts,
        Hq=Hq, Hkv=Hkv, D=D, S=S, BLOCKS_PER_PART=blocks_per_part, BLOCK_G=triton.next_power_of_2(Hq // Hkv),
        BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(S), IS_SINGLE=single)
    if not single:
        _decode_reduce_kernel[(B * Hq,)](out, part_m, part_l, part_acc, ctx, num_parts, Hq=Hq,
                                         PART_TOKENS=partition_size, D=D,
                                         BLOCK_P=triton.next_power_of_2(num_parts), BLOCK_D=block_d)
    return out
