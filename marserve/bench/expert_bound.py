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
  policy or prefetcher can reach issue 20's target on that trace at that budget;
- `demand_reads()` with `BeladyPolicy.over_fetches()`: the same count for a live run (`bench experts`), on the store's own
  fetches (one per pass and layer, a prefill's tokens together) from the routing the run recorded, beside the
  run's policy replayed the same way (which must read what the run read).

Legend: T=tokens, L=MoE layers, K=experts per token.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable

import numpy as np

from marserve.experts.policies import EvictionPolicy, Key


class BeladyPolicy(EvictionPolicy):
    """MIN over a routing trace ids [T, L, K]. The clock is the replay's: one tick per layer fetch, so layer l of
    token t is tick t*L + l + 1 (advance() runs before the layer's accesses)."""

    name = "belady"

    def __init__(self, ids: np.ndarray):
        self._start([(layer, experts) for per_layer in ids.tolist() for layer, experts in enumerate(per_layer)])

    @classmethod
    def over_fetches(cls, fetches: list[tuple[int, Iterable[int]]]) -> "BeladyPolicy":
        """MIN over any sequence of fetches (layer, experts), one tick each: the store's own (store_fetches, a
        prefill's tokens in one fetch per layer) for a live run."""
        policy = cls.__new__(cls)
        policy._start(fetches)
        return policy

    def _start(self, fetches) -> None:
        super().__init__()
        uses: dict[Key, list[int]] = {}
        for tick, (layer, experts) in enumerate(fetches, start=1):
            for e in set(experts):
                uses.setdefault((layer, e), []).append(tick)
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


# ---- the live runs' own count: the store's fetches replayed on demand (bench experts' live table) ----------------

Fetch = tuple[int, dict[int, int]]  # (layer index, expert -> routing decisions), one per MoE layer per forward pass


def store_fetches(ids: np.ndarray, step: np.ndarray, layer_ids: list[int]) -> list[Fetch]:
    """A recorded trace (ids [T, L, K], step [T]) as the store sees it: one fetch per forward pass and MoE layer,
    naming the experts of all the pass's tokens (a prefill is one pass), first use first."""
    fetches = []
    for s in np.unique(step):
        rows = ids[step == s]  # [t, L, K]
        for i, layer in enumerate(layer_ids):  # counted as OffloadedExperts.fetch counts them
            fetches.append((layer, dict(Counter(rows[:, i].reshape(-1).tolist()))))
    return fetches


def demand_reads(fetches: list[Fetch], policy: EvictionPolicy, num_slots: int, keys: list[Key],
                 counted_from: int = 0) -> int:
    """Experts read by the store's on-demand path (ExpertStore.start and fetch, no prefetch) with `policy` and
    `num_slots` slots over `fetches` -> reads from fetch `counted_from` on. keys: every expert in the store's
    order (the initial resident set is the policy's preferred prefix, as at start); the policy carries the usage
    prior already."""
    initial = set(policy.by_preference(keys)[:num_slots])
    slot_key: list[Key | None] = [None] * num_slots  # candidates go to the policy in slot order, as the store's do
    slot_of: dict[Key, int] = {}
    free = list(range(num_slots - 1, -1, -1))
    for key in keys:
        if key in initial:
            slot = free.pop()
            slot_key[slot], slot_of[key] = key, slot
            policy.on_insert(key)
    reads = 0
    for t, (layer, counts) in enumerate(fetches):
        policy.advance(layer)
        pinned: set[int] = set()
        for e, n in counts.items():
            key = (layer, e)
            slot = slot_of.get(key)
            if slot is None:
                if free:
                    slot = free.pop()
                else:
                    victim = policy.victim([k for s, k in enumerate(slot_key) if k is not None and s not in pinned])
                    slot = slot_of.pop(victim)
                    policy.on_evict(victim)
                slot_key[slot], slot_of[key] = key, slot
                policy.on_insert(key)
                reads += t >= counted_from
            pinned.add(slot)
            policy.on_access(key, n)
    return reads
