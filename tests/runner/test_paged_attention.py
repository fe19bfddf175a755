import random

import pytest
import torch

from marserve.attention import AttentionMetadata, attend

HQ, HKV, D, BS, NBLOCKS = 4, 2, 8, 4, 64
SCALE = D ** -0.5


def dense_reference(q, k, v):
    return attend(q, k, v, AttentionMetadata.dense([q.shape[0]]), 0, SCALE)


class PagedSeq:
    """A sequence whose K/V live in scattered blocks of a shared cache."""

    def __init__(self, length, free_blocks, seed):
        g = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v = (torch.randn(length, h, D, generator=g) for h in (HQ, HKV, HKV))
        self.blocks = [free_blocks.pop() for _ in range(-(-length // BS))]
        self.done = 0

    def chunk(self, n):
        lo, hi = self.done, self.done + n
        slots = torch.tensor([self.blocks[p // BS] * BS + p % BS for p in range(lo, hi)])
        return self.q[lo:hi], self.k[lo:hi], self.v[lo:hi], slots, lo


def run_step(seqs_and_lens, caches):
    parts = [s.chunk(n) for s, n in seqs_and_lens]
    width = max(len(s.blocks) for s, _ in seqs_and_lens)
    tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, _ in seqs_and_lens], dtype=torch.int32)
    meta = AttentionMetadata(query_lens=[n for _, n in seqs_and_lens], context_lens=[p[4] for p in parts],
                             kv_caches=caches, block_tables=tables, slot_mapping=torch.cat([p[3] for p in parts]))
    out = attend(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                 torch.cat([p[2] for p in parts]), meta, 0, SCALE)
    for s, n in seqs_and_lens:
        s.done += n
    return out.split([n for _, n in seqs_and_lens])


@pytest.mark.parametrize("schedule", ["whole", "chunked", "decode", "mixed"])
def test_paged_equals_dense(schedule):
    caches = [(torch.zeros(NBLOCKS, BS, HKV, D), torch.zeros(NBLOCKS, BS, HKV, D))]
    free_blocks = list(range(NBLOCKS))
    random.Random(0).shuffle(free_blocks)  # non-contiguous block tables
    lengths = [9, 14, 5]
    seqs = [PagedSeq(n, free_blocks, i) for i, n in enumerate(lengths)]
    got = {i: [] for i in range(len(seqs))}
    if schedule == "whole":
        steps = [[(i, n) for i, n in enumerate(lengths)]]
    elif schedule == "chunked":
        steps = [[(0, 4), (1, 6), (2, 3)], [(0, 5), (1, 8), (2, 2)]]
    elif schedule == "decode":
        steps = [[(0, 3), (1, 3), (2, 3)]] + [[(i, 1) for i in range(3) if t < lengths[i] - 3] for t in range(11)]
    else:  # decodes mixed with a prefill chunk in one pass
        steps = [[(0, 9), (1, 2)], [(0, 0), (1, 7), (2, 5)], [(1, 1)], [(1, 4)]]
    for step in steps:
        step = [(seqs[i], n) for i, n in step if n > 0]
        for (s, _), out in zip(step, run_step(step, caches)):
            got[seqs.index(s)].append(out)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[i]), dense_reference(s.q, s.k, s.v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_decode_with_rotary_equals_dense(backend, monkeypatch):
    """Decode passes with rotary=(cos, sin): on CPU the native kernel rotates, writes the cache and attends
    in one call; the torch path rotates first. Both must equal dense attention over rotated q/k."""
    monkeypatch.setenv("MARSERVE_ATTENTION_BACKEND", backend)
    g = torch.Generator().manual_seed(3)
    inv = torch.rand(D // 2, generator=g)
    emb = torch.arange(64, dtype=torch.float32)[:, None] * torch.cat([inv, inv])[None]
    cos, sin = emb.cos(), emb.sin()
    caches = [(torch.zeros(NBLOCKS, BS, HKV, D), torch.zeros(NBLOCKS, BS, HKV, D))]
    free_blocks = list(range(NBLOCKS))
    random.Random(1).shuffle(free_blocks)
    lengths = [9, 14, 5]
    seqs = [PagedSeq(n, free_blocks, 10 + i) for i, n in enumerate(lengths)]
    got = {i: [] for i in range(3)}
    steps = [[(0, 3), (1, 3), (2, 3)]] + [[(i, 1) for i in range(3) if t < lengths[i] - 3] for t in range(11)]
    for step in steps:
        step = [(seqs[i], n) for i, n in step]
        parts = [s.chunk(n) for s, n in step]
        width = max(len(s.blocks) for s, _ in step)
        positions = torch.cat([torch.arange(p[4], p[4] + n) for p, (_, n) in zip(parts, step)])
        meta = AttentionMetadata(
            query_lens=[n for _, n in step], context_lens=[p[4] for p in parts], kv_caches=caches,
            block_tables=torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s, _ in step]),
            slot_mapping=torch.cat([p[3] for p in parts]))
        out = attend(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                     torch.cat([p[2] for p in parts]), meta, 0, SCALE, rotary=(cos[positions], sin[positions]))
        for (s, n), o in zip(step, out.split([n for _, n in step])):
            s.done += n
            got[seqs.index(s)].append(o)
    from marserve.attention import apply_rope
    for i, s in enumerate(seqs):
        c, sn = cos[:len(s.q)], sin[:len(s.q)]
        want = dense_reference(apply_rope(s.q, c, sn), apply_rope(s.k, c, sn), s.v)
        torch.testing.assert_close(torch.cat(got[i]), want, atol=1e-5, rtol=1e-5)


def test_native_decode_is_what_runs_on_cpu(monkeypatch):
    """The default CPU decode path is the native kernel (when built), not a silent fallback."""
    from marserve import attention
    from marserve_kernels import cpu_attention_native
    reason = cpu_attention_native.unavailable_reason(torch.float32)
    if reason:
        pytest.skip(reason)
    monkeypatch.delenv("MARSERVE_ATTENTION_BACKEND", raising=False)
    calls = []
    real = cpu_attention_native.DecodePlan.run
    monkeypatch.setattr(cpu_attention_native.DecodePlan, "run", lambda self, *a: calls.append(1) or real(self, *a))
    caches = [(torch.zeros(NBLOCKS, BS, HKV, D), torch.zeros(NBLOCKS, BS, HKV, D))]
    meta = AttentionMetadata(query_lens=[1], context_lens=[2], kv_caches=caches,
                             block_tables=torch.tensor([[5]]), slot_mapping=torch.tensor([22]))
    q, k, v = torch.randn(1, HQ, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D)
    attention.attend(q, k, v, meta, 0, SCALE, rotary=(torch.ones(1, D), torch.zeros(1, D)))
    assert calls == [1]
