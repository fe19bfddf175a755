"""The trace replay's offline bound: Belady's MIN, the eviction that knows the future (never runs in the engine).

On a miss with the pool full, MIN evicts the resident expert whose next use lies farthest ahead in the trace
(never used again: farthest of all). With demand fetching, the same pool, the same budget and the same initial
resident set, no eviction policy moves fewer experts; and no prefetching moves fewer either (a prefetch is a
transfer too, and a schedule that fetches early can be turned into a demand one with no more fetches). So:

- `BeladyPolicy` plugs into `replay()` as one more `EvictionPolicy` (`ReplayConfig(policy="belady")`, on demand),
  which gives MIN's transfers and its on-demand modelled time under the same time model as every other row;
- `time_floor_s()`: no configuration can take less than max(all compute, MIN's transfers x one transfer), the
  time if every one of MIN's transfers were hidden behind compute or behind another transfer on the one link.
  This is the bound printed as "offline optimal (Belady), a bound"; if it is not 25% below on-demand lru, no
  policy or prefetcher can reach issue 20's target on that trace at that budget.

Legend: T=tokens, L=MoE layers, K=experts per token.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

from marserve.experts.policies import EvictionPolicy, Key


class BeladyPolicy(EvictionPolicy):
    """MIN over a routing trace ids [T, L, K]. The clock is the replay's: one tick per layer fetch, so layer l of
    token t is tick t*L + l + 1 (advance() runs before the layer's accesses)."""

    name = "belady"

    def __init__(self, ids: np.ndarray):
        super().__init__()
        T, L, _ = ids.shape
        uses: dict[Key, list[int]] = {}
        for t, per_layer in enumerate(ids.tolist()):
            for layer, experts in enumerate(per_layer):
                for e in set(experts):
                    uses.setdefault((layer, e), []).append(t * L + layer + 1)
        self.uses_at = uses  # key -> ticks of its uses, ascending
        self.next_use: dict[Key, float] = {}

    def _after(self, key: Key, tick: int, strictly: bool) -> float:
        at = self.uses_at.get(key, [])
        i = (bisect_right if strictly else bisect_left)(at, tick)
        return at[i] if i < len(at) else float("inf")

    def on_insert(self, key: Key) -> None:
        super().on_insert(key)
        self.next_use[key] = self._after(key, self.tick, strictly=False)

    def on_access(self, key: Key, n: int = 1) -> None:
        super().on_access(key, n)
        self.next_use[key] = self._after(key, self.tick, strictly=True)

    def victim(self, candidates: list[Key]) -> Key:
        # ties (never used again) go to the lowest key: deterministic
        return max(candidates, key=lambda k: (self.next_use.get(k, float("inf")), -k[0], -k[1]))


def time_floor_s(compute_s: float, transfers: int, transfer_s: float) -> float:
    """No configuration of the replay takes less: all compute runs in order, and the one link carries at least
    MIN's transfers one after another."""
    return max(compute_s, transfers * transfer_s)
