"""A test-only prefetcher: asks every MoE layer's provider to prefetch random experts before each step and, from
inside the forward pass (as a routing observer), random experts of random layers; outputs must not change."""

from __future__ import annotations

import random

import torch


class RandomPrefetcher:
    def __init__(self, model, seed: int = 0, per_call: int = 3):
        self.blocks = model.moe_blocks()
        self.rng = random.Random(seed)
        self.per_call = per_call
        self.calls = 0

    def _random_prefetch(self) -> None:
        block = self.rng.choice(self.blocks)
        E = block.experts.num_experts
        ids = torch.tensor([self.rng.randrange(E) for _ in range(self.per_call)], dtype=torch.int64)
        block.experts.prefetch(ids)
        self.calls += 1

    def install(self) -> None:
        for block in self.blocks:
            block.routing_observer = lambda *args: self._random_prefetch()

    def before_step(self, input_ids_per_sequence, is_prefill, seq_keys=None, start_pos=None) -> None:
        for _ in range(len(self.blocks)):
            self._random_prefetch()
        for block in self.blocks:  # a random forecast too: eviction may follow any forecast, outputs never change
            E = block.experts.num_experts
            block.experts.expect({self.rng.randrange(E): sorted(self.rng.sample(range(1, 4 * len(self.blocks)), 2))
                                  for _ in range(self.rng.randrange(3))})


def install_random_prefetcher(llm, seed: int = 0) -> RandomPrefetcher:
    p = RandomPrefetcher(llm.model, seed)
    p.install()
    llm.engine.prefetcher = p
    return p
