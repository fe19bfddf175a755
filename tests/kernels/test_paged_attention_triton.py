"""Triton paged attention (interpreter) against its torch references and marserve.attention's CPU path.

Named *_triton: tests/runner/test_paged_attention.py exists, and pytest (rootdir imports, no packages)
refuses two test modules with one basename."""

from __future__ import annotations

import pytest
import torch

from marserve.attention import AttentionMetadata, attend
from marserve_kernels.paged_attention import (paged_attention_decode, paged_attention_decode_reference,
                                              paged_attention_prefill, paged_attention_prefill_reference,
                                              write_kv_cache, write_kv_cache_reference)

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _setup(lens, S, Hkv, D, dtype, g, num_blocks=64):
    """A cache with scattered blocks holding `lens` tokens per sequence; block tables padded with 0."""
    k_cache = torch.randn(num_blocks, S, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, S, Hkv, D, generator=g).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // S) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for s, n in enumerate(lens):
        for b in range(-(-n // S)):
            tables[s, b] = free.pop()
    return k_cache, v_cache, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("S,Hq,Hkv", [(4, 4, 4), (16, 8, 4), (4, 8, 2)])
def test_decode_matches_reference(dtype, S, Hq, Hkv):
    g = torch.Generator().manual_seed(S * 10 + Hq)
    lens, D = [1, 5, 17, S, 33], 24  # lengths that are not block multiples; D not a power of two
    k_cache, v_cache, tables = _setup(lens, S, Hkv, D, dtype, g)
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_attention_decode(q, k_cache, v_cache, tables, ctx, D**-0.5)
    want = paged_attention_decode_reference(q, k_cache, v_cache, tables, ctx, D**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,Hq,Hkv", [(4, 4, 2), (16, 4, 1), (4, 6, 2)])  # groups of 2, 4, 3 query heads
def test_prefill_chunks_match_reference(dtype, S, Hq, Hkv):
    g = torch.Generator().manual_seed(S + Hq)
    D = 16
    new, cached = [7, 1, 20, 3], [0, 9, 5, 30]  # first chunks, a decode, a chunk after a cached prefix
    lens = [n + c for n, c in zip(new, cached)]
    k_cache, v_cache, tables = _setup(lens, S, Hkv, D, dtype, g)
    q = torch.randn(sum(new), Hq, D, generator=g).to(dtype)
    starts = torch.tensor([0] + list(torch.cumsum(torch.tensor(new), 0)), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_attention_prefill(q, k_cache, v_cache, tables, starts, ctx, 0.25, block_q=8)
    want = paged_attention_prefill_reference(q, k_cache, v_cache, tables, starts, ctx, 0.25)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_write_and_attend_equal_the_cpu_paged_path():
    """Same inputs through marserve.attention (CPU) and through write_kv_cache + the Triton kernels."""
    g = torch.Generator().manual_seed(5)
    S, Hq, Hkv, D = 4, 4, 2, 16
    new, cached = [6, 1, 3], [0, 7, 10]
    lens = [n + c for n, c in zip(new, cached)]
    k_cache, v_cache, tables = _setup(lens, S, Hkv, D, torch.float32, g)
    T = sum(new)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    slots = torch.tensor([int(tables[s, p // S]) * S + p % S for s in range(3) for p in range(cached[s], lens[s])])
    cpu_k, cpu_v = k_cache.clone(), v_cache.clone()
    meta = AttentionMetadata(query_lens=new, context_lens=cached, kv_caches=[(cpu_k, cpu_v)],
                             block_tables=tables.long(), slot_mapping=slots)
    want = attend(q, k, v, meta, 0, D**-0.5)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, cpu_k) and torch.equal(v_cache, cpu_v) and torch.equal(k_cache, ref_k)
    starts = torch.tensor([0, 6, 7, 10], dtype=torch.int32)
    got = paged_attention_prefill(q, k_cache, v_cache, tables, starts, torch.tensor(lens), D**-0.5, block_q=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# hidden 64 -> head dim 16: with 16-token blocks the prefill takes its tl.dot path; hidden 32 (head dim 8) does not.
@pytest.mark.parametrize("hidden,block_size,budget", [(32, 4, 9), (64, 16, 20)])
def test_a_model_run_on_triton_paged_attention_gives_the_same_tokens(baby_checkpoint, monkeypatch, hidden,
                                                                     block_size, budget):
    from marserve import LLM, SamplingParams
    path = baby_checkpoint("qwen3_moe", hidden_size=hidden)
    prompts = ["The quick brown fox", "rivers and mountains and seas", "a"]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MARSERVE_ATTENTION_BACKEND", backend)
        llm = LLM(path, dtype="float32", block_size=block_size, max_num_batched_tokens=budget)  # chunked prefill
        runs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert runs["triton"] == runs["torch"]


@pytest.mark.parametrize("dtype,S,Hq,Hkv,partition", [
    (torch.float32, 4, 8, 2, 8),      # many partitions, GQA 4
    (torch.float32, 16, 4, 1, 16),    # one block per partition, all query heads on one KV head
    (torch.float32, 16, 4, 4, 4096),  # one partition covers every context: the no-reduction path
    (torch.float16, 4, 4, 2, 12),     # a partition of 3 blocks (not a power of two)
    (torch.bfloat16, 16, 8, 4, 32),
    (torch.float32, 4, 6, 2, 8),      # a group of 3 query heads, padded to 4 rows
])
def test_split_k_decode_matches_reference(dtype, S, Hq, Hkv, partition):
    g = torch.Generator().manual_seed(S * 100 + partition)
    lens, D = [1, 5, 37, 70], 24  # the short sequences leave most partitions empty
    k_cache, v_cache, tables = _setup(lens, S, Hkv, D, dtype, g)
    tables = torch.cat([tables, torch.zeros(len(lens), 2, dtype=torch.int32)], 1)  # padding past every context
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_attention_decode(q, k_cache, v_cache, tables, ctx, D**-0.5, partition_size=partition)
    want = paged_attention_decode_reference(q, k_cache, v_cache, tables, ctx, D**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_split_k_decode_rejects_bad_shapes_and_takes_an_empty_batch():
    k_cache = v_cache = torch.zeros(4, 4, 2, 8)
    q, tables, ctx = torch.zeros(1, 4, 8), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the block size"):
        paged_attention_decode(q, k_cache, v_cache, tables, ctx, 1.0, partition_size=6)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention_decode(torch.zeros(1, 3, 8), k_cache, v_cache, tables, ctx, 1.0, partition_size=4)
    empty = paged_attention_decode(q[:0], k_cache, v_cache, tables[:0], ctx[:0], 1.0, partition_size=4)
    assert empty.shape == (0, 4, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_q,group_heads", [
    (16, False),  # 16 rows with 16-token blocks: the tl.dot path, one query head per program
    (8, True),    # 8 queries x 2 heads of a KV group = 16 rows: tl.dot, K/V shared by the group
    (4, True),    # 4 x 2 = 8 rows: broadcast-and-sum
    (8, False),
])
def test_prefill_dot_and_sum_paths_match_reference(dtype, block_q, group_heads):
    g = torch.Generator().manual_seed(block_q)
    S, Hq, Hkv, D = 16, 4, 2, 24  # D pads to 32 inside the kernel
    # chunks spanning 1..3 query tiles after cached prefixes, and a sequence with no new token this pass
    new, cached = [7, 1, 20, 0, 3, 17], [0, 9, 5, 16, 30, 16]
    lens = [n + c for n, c in zip(new, cached)]
    k_cache, v_cache, tables = _setup(lens, S, Hkv, D, dtype, g)
    q = torch.randn(sum(new), Hq, D, generator=g).to(dtype)
    starts = torch.tensor([0] + list(torch.cumsum(torch.tensor(new), 0)), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_attention_prefill(q, k_cache, v_cache, tables, starts, ctx, D**-0.5, block_q=block_q,
                                  group_heads=group_heads)
    want = paged_attention_prefill_reference(q, k_cache, v_cache, tables, starts, ctx, D**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_int64_index_tensors_and_a_host_max_query_len_give_the_same_results():
    """The model runner's int64 block tables go in without a cast; max_query_len skips the device read."""
    g = torch.Generator().manual_seed(11)
    S, Hq, Hkv, D = 4, 4, 2, 16
    new, cached = [5, 1, 9], [3, 12, 0]
    lens = [n + c for n, c in zip(new, cached)]
    k_cache, v_cache, tables = _setup(lens, S, Hkv, D, torch.float32, g)
    q = torch.randn(sum(new), Hq, D, generator=g)
    starts = torch.tensor([0] + list(torch.cumsum(torch.tensor(new), 0)), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = paged_attention_prefill_reference(q, k_cache, v_cache, tables, starts, ctx, 0.3)
    got = paged_attention_prefill(q, k_cache, v_cache, tables.long(), starts.long(), ctx.long(), 0.3, block_q=4,
                                  max_query_len=max(new))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    qd = torch.randn(len(lens), Hq, D, generator=g)
    want = paged_attention_decode_reference(qd, k_cache, v_cache, tables, ctx, 0.3)
    for partition in (None, 4):
        got = paged_attention_decode(qd, k_cache, v_cache, tables.long(), ctx.long(), 0.3, partition_size=partition)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_skips_negative_slots_and_casts_to_the_cache_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    # Each cache is a view past a guard block, where an unskipped slot -1 would land.
    k_buf, v_buf = torch.zeros(7, 4, 2, 8, dtype=dtype), torch.zeros(7, 4, 2, 8, dtype=dtype)
    k_cache, v_cache = k_buf[1:], v_buf[1:]
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)  # fp32 into a `dtype` cache
    slots = torch.tensor([13, -1, 0, 23, -1])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    write_kv_cache_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert torch.equal(k_cache[3, 1], k[0].to(dtype)) and int((k_cache != 0).any(-1).any(-1).sum()) == 3
    assert not k_buf[0].any() and not v_buf[0].any()
