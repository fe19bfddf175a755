"""Which resident expert the store evicts when it needs a slot: `lru`, `lfu` and `mar`; plain Python, no model.

A key is (layer_idx, expert). The store tells a policy what happens to keys (inserted, used, evicted, predicted
by the prefetcher) and asks it for a victim among the keys it may evict (never pinned or still loading ones).
Every policy also orders the initial resident set by the usage prior (`set_scores`): higher usage first.

- lru: the key used longest ago.
- lfu: the key used least often since start (counts outlive evictions: an expert's history is what predicts it),
  ties to the least recent.
- mar: the lowest score = prior + decayed frequency + a bonus while a prefetch prediction is pending. The prior
  is the layer's usage normalised to mean 1 (MAR's `usage`, or calibration); frequency decays with a half-life
  of `half_life` ticks (one tick = one fetch of one layer, so ~`half_life / layers` decode steps); a predicted
  key is kept ahead of any unpredicted one until it is used or its prediction is `prediction_ttl` ticks old.
  `mar` also pins the hottest experts by prior (see `num_pinned`).
"""

from __future__ import annotations

Key = tuple[int, int]  # (layer_idx, expert)

POLICIES = ("lru", "lfu", "mar")


class EvictionPolicy:
    """Bookkeeping shared by every policy: a logical clock, last use, use counts and the usage prior."""

    name = "base"

    def __init__(self):
        self.tick = 0
        self.last_used: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}
        self.prior: dict[int, list[float]] = {}  # layer -> [E] usage normalised to mean 1

    def set_scores(self, layer_idx: int, usage: list[float]) -> None:
        """The usage prior of one layer (higher = keep); any non-negative scale."""
        total = sum(max(u, 0.0) for u in usage)
        n = len(usage)
        self.prior[layer_idx] = [max(u, 0.0) * n / total if total > 0 else 1.0 for u in usage]

    def prior_of(self, key: Key) -> float:
        scores = self.prior.get(key[0])
        return scores[key[1]] if scores is not None else 1.0

    def has_scores(self) -> bool:
        return bool(self.prior)

    def by_preference(self, keys: list[Key]) -> list[Key]:
        """keys, most worth keeping first by the prior alone (the initial resident set takes a prefix). Equal
        priors go by expert index, then layer, so every layer gets its share."""
        return sorted(keys, key=lambda k: (-self.prior_of(k), k[1], k[0]))

    def advance(self) -> None:
        """One fetch happened (the clock for recency and decay)."""
        self.tick += 1

    def on_insert(self, key: Key) -> None:
        self.last_used.setdefault(key, self.tick)

    def on_access(self, key: Key, n: int = 1) -> None:
        """key was used by n routing decisions in this fetch."""
        self.last_used[key] = self.tick
        self.uses[key] = self.uses.get(key, 0) + n

    def on_evict(self, key: Key) -> None:
        pass

    def on_predict(self, key: Key) -> None:
        """The prefetcher asked for key ahead of its use."""

    def victim(self, candidates: list[Key]) -> Key:
        raise NotImplementedError

    def num_pinned(self, num_slots: int, min_slots: int) -> int:
        """How many of the hottest experts (by prior) stay resident for good: none, except under `mar`."""
        return 0


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: self.last_used.get(k, -1))


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.uses.get(k, 0), self.last_used.get(k, -1)))


class MARPolicy(EvictionPolicy):
    name = "mar"
    PREDICTED_BONUS = 1e6  # a pending prediction outranks any history

    def __init__(self, half_life: float = 32.0, prediction_ttl: int = 64, pin_share: float = 0.25):
        super().__init__()
        self.half_life = half_life
        self.prediction_ttl = prediction_ttl
        self.pin_share = pin_share
        self.freq: dict[Key, float] = {}  # decayed use count as of last_used
        self.predicted: dict[Key, int] = {}  # key -> tick of its pending prediction

    def _decayed(self, key: Key) -> float:
        f = self.freq.get(key, 0.0)
        return f * 0.5 ** ((self.tick - self.last_used.get(key, self.tick)) / self.half_life) if f else 0.0

    def on_access(self, key: Key, n: int = 1) -> None:
        self.freq[key] = self._decayed(key) + n
        self.predicted.pop(key, None)
        super().on_access(key, n)

    def on_evict(self, key: Key) -> None:
        self.predicted.pop(key, None)

    def on_predict(self, key: Key) -> None:
        self.predicted[key] = self.tick

    def score(self, key: Key) -> float:
        s = self.prior_of(key) + self._decayed(key)
        when = self.predicted.get(key)
        if when is not None and self.tick - when <= self.prediction_ttl:
            s += self.PREDICTED_BONUS
        return s

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.score(k), self.last_used.get(k, -1)))

    def num_pinned(self, num_slots: int, min_slots: int) -> int:
        """A quarter (pin_share) of the slots beyond the minimum, and only with a prior to choose by: the minimum
        itself must stay evictable, or a step needing other experts could not run."""
        if not self.has_scores():
            return 0
        return int((num_slots - min_slots) * self.pin_share)


def make_policy(name: str, num_moe_layers: int = 1) -> EvictionPolicy:
    """The policy called `name` (one of POLICIES); mar's clock constants scale with the layers (ticks per step)."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "mar":
        return MARPolicy(half_life=8.0 * num_moe_layers, prediction_ttl=2 * num_moe_layers)
    raise ValueError(f"expert_policy {name!r} is not one of {', '.join(POLICIES)}")
