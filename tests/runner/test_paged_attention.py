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
