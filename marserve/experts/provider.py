"""The one narrow interface through which an MoE layer gets its expert weights.

`ResidentExperts` keeps every expert in fast memory; `marserve.experts.offloaded.OffloadedExperts` serves
them from the tiered store (a bounded slot pool over the checkpoint files). Model files never know which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class ExpertWeights(NamedTuple):
    """Weights ready for one MoE computation, and the routing ids re-indexed into them.

    Legend: E'=rows held, I=expert intermediate size, H=hidden size, T=tokens, K=experts per token.
    """

    w13: torch.Tensor  # [E', 2I, H]  gate rows, then up rows (transformers 5.x layout)
    w2: torch.Tensor  # [E', H, I]
    topk_ids: torch.Tensor  # [T, K] indices into the E' rows


@dataclass
class ExpertCacheStats:
    """Counters of one layer's expert store since start (what the server exports as metrics).

    A lookup is one (token, expert) routing decision; it is a hit when the expert was already in
    fast memory. With every expert resident each lookup is a hit and nothing moves.
    """

    layer_idx: int
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    prefetches: int = 0  # experts asked for ahead of use
    prefetch_hits: int = 0  # prefetched experts that were then used
    bytes_moved: int = 0  # bytes copied from a slower tier into fast memory
    stall_seconds: float = 0.0  # time the forward pass waited for expert weights

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 1.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_hits / self.prefetches if self.prefetches else 0.0


class ExpertProvider(nn.Module):
    """Holds (or fetches) the experts of one MoE layer."""

    def __init__(self, layer_idx: int, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.stats = ExpertCacheStats(layer_idx)

    def fetch(self, topk_ids: torch.Tensor) -> ExpertWeights:
        """Return weights covering every expert named in `topk_ids` [T, K]."""
        raise NotImplementedError

    def compute(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum: x [T,H], topk_weights [T,K] (x's dtype), topk_ids [T,K] -> [T,H].

        By default the experts are fetched here and run by marserve_kernels.moe; a provider whose experts
        live elsewhere (other ranks, marserve/experts/parallel.py) sends the tokens to them instead."""
        import marserve_kernels  # resolved per call so a kernel package patched in tests is picked up
        ew = self.fetch(topk_ids)
        return marserve_kernels.moe(x, ew.w13, ew.w2, topk_weights, ew.topk_ids)

    def local_slot(self, expert: int) -> int | None:
        """Row of the stacked expert parameters that holds `expert`, or None when this provider does not keep
        it (the loader then skips that checkpoint tensor)."""
        return expert

    def prefetch(self, expert_ids: torch.Tensor) -> int:
        """Hint that these experts will be wanted soon -> how many of them could not be started for want of a slot
        worth taking now (0: every one is resident, being read or started). Resident experts need nothing."""
        return 0

    def expect(self, uses: dict[int, list[int]]) -> None:
        """A forecast of this layer's experts (expert -> the fetches from now, 1 = the next fetch of any MoE
        layer, at which it will be used; {}: none), replacing the last. Resident experts need none."""

    def reads_in_flight(self) -> int:
        """Expert reads under way (of any layer sharing this provider's slow tier)."""
        return 0

    def wrong_guess_seconds(self) -> float:
        """What one wrong prefetch costs the reads after it, in seconds (0: nothing is ever read). The prefetcher
        weighs a guess's gain against it."""
        return 0.0

    def set_scores(self, usage: torch.Tensor) -> None:
        """The placement / eviction prior of this layer's experts, usage [E] (higher = keep). Resident experts
        need none."""

    def resident(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13 [E, 2I, H], w2 [E, H, I]) covering every expert, when all of them stay in fast memory for as
        long as the provider lives; None otherwise. A caller that computes with these instead of calling
        fetch() (the fused CPU decode kernel, which routes and runs the experts in one call) reports its
        routing decisions with record_lookups()."""
        return None

    def record_lookups(self, n: int) -> None:
        """Count n routing decisions (token, expert) served from resident() weights (each is a hit)."""
        self.stats.lookups += n
        self.stats.hits += n


class ResidentExperts(ExpertProvider):
    """All experts of the layer live in one stacked pair of parameters on the model's device."""

    def __init__(self, layer_idx: int, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(layer_idx, num_experts, hidden_size, intermediate_size)
        E, H, I = num_experts, hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device=device))

    def fetch(self, topk_ids: torch.Tensor) -> ExpertWeights:
        self.record_lookups(topk_ids.numel())
        return ExpertWeights(self.w13, self.w2, topk_ids)

    def resident(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13, self.w2
