"""Which resident expert the store evicts when it needs a slot: `lru`, `lfu` and `mar`; plain Python, no model.

A key is (layer_idx, expert). The store tells a policy what happens to keys (inserted, used, evicted, predicted
by the prefetcher) and asks it for a victim among the keys it may evict (never pinned or still loading ones).
Every policy also orders the initial resident set by the usage prior (`set_scores`): higher usage first.

- lru: the key used longest ago.
- lfu: the key used least often since start (counts outlive evictions: an expert's history is what predicts it),
  ties to the least recent.
- mar: the key whose expected next use is farthest away (Belady's MIN with the future estimated; the replay's
  bound, marserve/bench/expert_bound.py, is MIN with the real future). Layers are fetched in a cycle, one tick
  each, so a key of layer j is next wanted no sooner than its layer's next fetch, d ticks ahead (1..L; the layer
  just fetched: L), and then with probability p per fetch of its layer: expected distance d + L (1 - p) / p.
  p blends the key's decayed use count (half-life `half_life` ticks, one tick = one fetch of one layer, so
  ~`half_life / layers` decode steps) per decayed fetch of its layer with the prior: the layer's usage
  normalised to mean 1 (MAR's `usage`, or calibration) x the experts used per fetch / E. A key with a pending
  prefetch prediction (until used, or `prediction_ttl` ticks) is kept ahead of any unpredicted one. Told no
  layer order (advance() without a layer), distance drops out: the lowest prior + decayed frequency goes.
  `mar` also pins the hottest experts by prior (`num_pinned`).
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
        self.layer: int | None = None  # the layer of the current fetch, when the caller says

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

    def advance(self, layer: int | None = None) -> None:
        """A fetch of `layer` begins (the clock for recency and decay; accesses and victims of it follow)."""
        self.tick += 1
        self.layer = layer

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
    PREDICTED_BONUS = 1e6  # a pending prediction outranks any history (the fallback score without layer order)
    PRIOR_WEIGHT = 4.0  # the prior counts as this many fetches of the layer when p is estimated

    def __init__(self, half_life: float = 32.0, prediction_ttl: int = 64, pin_share: float = 0.25,
                 num_layers: int = 1):
        super().__init__()
        self.half_life = half_life
        self.prediction_ttl = prediction_ttl
        self.pin_share = pin_share
        self.num_layers = num_layers
        self.freq: dict[Key, float] = {}  # decayed use count as of last_used
        self.predicted: dict[Key, int] = {}  # key -> tick of its pending prediction
        self.fetches: dict[int, tuple[float, int]] = {}  # layer -> (decayed count of its fetches, as of tick)
        self.keys_per_fetch = 0.0  # decayed mean of the keys one fetch uses
        self._accessed = 0  # keys accessed in the current fetch
        self._position: dict[int, int] = {}  # layer -> place in the cycle of fetches (sorted layer ids)

    def _fade(self, ticks: int) -> float:
        return 0.5 ** (ticks / self.half_life)

    def _decayed(self, key: Key) -> float:
        f = self.freq.get(key, 0.0)
        return f * self._fade(self.tick - self.last_used.get(key, self.tick)) if f else 0.0

    def _place(self, layer: int) -> int:
        if layer not in self._position:
            layers = sorted(set(self._position) | {layer})
            self._position = {j: i for i, j in enumerate(layers)}
        return self._position[layer]

    def _cycle(self) -> int:
        return max(self.num_layers, len(self._position))

    def _distance(self, layer: int) -> int:
        """Ticks until `layer` is fetched again (the current layer: a whole cycle)."""
        return (self._place(layer) - self._place(self.layer) - 1) % self._cycle() + 1

    def advance(self, layer: int | None = None) -> None:
        if self.layer is not None and self.tick:  # close the fetch that ends here
            self.keys_per_fetch += (self._accessed - self.keys_per_fetch) / 8
        super().advance(layer)
        self._accessed = 0
        if layer is not None:
            self._place(layer)
            n, at = self.fetches.get(layer, (0.0, self.tick))
            self.fetches[layer] = (n * self._fade(self.tick - at) + 1, self.tick)

    def on_access(self, key: Key, n: int = 1) -> None:
        self.freq[key] = self._decayed(key) + 1  # fetches that used it (n decisions in one fetch count once)
        self.predicted.pop(key, None)
        self._accessed += 1
        super().on_access(key, n)

    def on_evict(self, key: Key) -> None:
        self.predicted.pop(key, None)

    def on_predict(self, key: Key) -> None:
        self.predicted[key] = self.tick

    def _pending(self, key: Key) -> bool:
        when = self.predicted.get(key)
        return when is not None and self.tick - when <= self.prediction_ttl

    def score(self, key: Key) -> float:
        """Keep-worthiness without layer order: prior + decayed frequency (+ a bonus while predicted)."""
        return self.prior_of(key) + self._decayed(key) + (self.PREDICTED_BONUS if self._pending(key) else 0.0)

    def _layer_terms(self, layer: int) -> tuple[int, float, float]:
        """(ticks to the layer's next fetch, its decayed fetch count, experts used per fetch / E)."""
        n, at = self.fetches.get(layer, (0.0, self.tick))
        num_experts = len(self.prior.get(layer, ())) or max(self.keys_per_fetch, 1.0) * 4
        return self._distance(layer), n * self._fade(self.tick - at), max(self.keys_per_fetch, 1.0) / num_experts

    def use_probability(self, key: Key, terms: tuple[int, float, float] | None = None) -> float:
        """Estimated chance that a fetch of key's layer uses key: its decayed uses per decayed fetch of the layer,
        with the prior as PRIOR_WEIGHT fetches' worth of evidence."""
        _, fetches, per_expert = terms or self._layer_terms(key[0])
        prior_p = min(1.0, self.prior_of(key) * per_expert)
        return (self._decayed(key) + self.PRIOR_WEIGHT * prior_p) / (fetches + self.PRIOR_WEIGHT)

    def expected_distance(self, key: Key, terms: tuple[int, float, float] | None = None) -> float:
        """Ticks until key is expected to be used: its layer's next fetch, then one cycle per expected miss."""
        terms = terms or self._layer_terms(key[0])
        if self._pending(key):
            return terms[0]
        p = self.use_probability(key, terms)
        return terms[0] + self._cycle() * (1 - p) / p if p > 0 else float("inf")

    def victim(self, candidates: list[Key]) -> Key:
        if self.layer is None:
            return min(candidates, key=lambda k: (self.score(k), self.last_used.get(k, -1)))
        terms = {layer: self._layer_terms(layer) for layer in {k[0] for k in candidates}}  # once per layer
        # a pending prediction outranks any estimate: the prefetcher's guess is about this very token
        return max(candidates, key=lambda k: (not self._pending(k), self.expected_distance(k, terms[k[0]]),
                                              -self.last_used.get(k, -1)))

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
        return MARPolicy(half_life=8.0 * num_moe_layers, prediction_ttl=2 * num_moe_layers, num_layers=num_moe_layers)
    raise ValueError(f"expert_policy {name!r} is not one of {', '.join(POLICIES)}")
