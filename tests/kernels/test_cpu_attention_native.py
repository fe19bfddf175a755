"""Native fused decode attention (RoPE + KV write + paged attention) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from marserve_kernels import cpu_attention_native as native

UNAVAILABLE = native.unavailable_reason(torch.float32) or native.unavailable_reason(torch.bfloat16)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _case(lens, S, Hq, Hkv, D, cache_dtype, g, num_blocks=64):
    """Sequences of `lens` tokens after this step (the last one new), in scattered blocks; a fused qkv
    buffer with q/k/v as strided views, as the model hands them over."""
    k_cache = torch.randn(num_blocks, S, Hkv, D, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, S, Hkv, D, generator=g).to(cache_dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // S) for n in lens) + 1  # one spare column: the kernel must stop at L
    tables = torch.full((len(lens), width), 10**6, dtype=torch.int64)  # junk past each sequence's blocks
    slots = []
    for s, n in enumerate(lens):
        for b in range(-(-n // S)):
            tables[s, b] = free.pop()
        slots.append(int(tables[s, (n - 1) // S]) * S + (n - 1) % S)
    B = len(lens)
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g)
    q = qkv[:, :Hq * D].view(B, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(B, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(B, Hkv, D)
    angles = torch.tensor(lens, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g)[None]
    emb = torch.cat([angles, angles], -1)
    return q, k, v, emb.cos(), emb.sin(), k_cache, v_cache, tables, torch.tensor(lens), torch.tensor(slots)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,Hq,Hkv,D", [(16, 8, 4, 64), (4, 4, 4, 24), (8, 8, 1, 32), (16, 16, 2, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference(cache_dtype, S, Hq, Hkv, D, threads):
    g = torch.Generator().manual_seed(S * 100 + Hq * 10 + D)
    lens = [1, 5, 17, S, 33, 2 * S + 1]  # a first token, block boundaries, uneven lengths
    args = _case(lens, S, Hq, Hkv, D, cache_dtype, g)
    q, k, v, cos, sin, k_cache, v_cache, tables, seq_lens, slots = args
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = native.decode_attention_reference(q, k, v, cos, sin, k_ref, v_ref, tables, seq_lens, slots, D**-0.5)
    got = native.decode_attention(q, k, v, cos, sin, k_cache, v_cache, tables, seq_lens, slots, D**-0.5,
                                  threads=threads)
    written = torch.zeros(k_cache.shape[0] * S, dtype=torch.bool)
    written[slots] = True
    for got_c, ref_c in ((k_cache, k_ref), (v_cache, v_ref)):  # the new slots hold k/v, no other slot changed
        got_c, ref_c = got_c.view(-1, Hkv, D), ref_c.view(-1, Hkv, D)
        assert torch.equal(got_c[~written], ref_c[~written])
        close = 1e-6 if cache_dtype == torch.float32 else 1e-2  # FMA vs two roundings (then bf16 rounding)
        torch.testing.assert_close(got_c[written], ref_c[written], atol=close, rtol=close)
    tol = 1e-5 if cache_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_bf16_activations_and_a_long_sequence():
    g = torch.Generator().manual_seed(7)
    args = list(_case([700, 3], 16, 8, 2, 64, torch.bfloat16, g, num_blocks=64))
    args[:3] = [t.to(torch.bfloat16) for t in args[:3]]
    q, k, v, cos, sin, k_cache, v_cache, tables, seq_lens, slots = args
    want = native.decode_attention_reference(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), tables,
                                             seq_lens, slots, 0.125)
    got = native.decode_attention(q, k, v, cos, sin, k_cache, v_cache, tables, seq_lens, slots, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_unsupported_shapes_are_refused_not_computed():
    q = torch.zeros(1, 6, 8)
    assert not native.supports(q, torch.zeros(4, 4, 4, 8))  # 6 query heads over 4 KV heads
    assert not native.supports(torch.zeros(1, 34, 8), torch.zeros(4, 4, 2, 8))  # group of 17
    assert native.supports(torch.zeros(1, 8, 8), torch.zeros(4, 4, 2, 8))
