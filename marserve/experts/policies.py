"""Which resident expert the store evicts when it needs a slot: `lru`, `lfu` and `mar`; plain Python, no model.

A key is (layer_idx, expert). The store tells a policy what happens to keys (inserted, used, evicted, predicted
by the prefetcher) and asks it for a victim among the keys it may evict (never pinned or still loading ones).
Every policy also orders the initial resident set by the usage prior (`set_scores`): higher usage first.
Every policy also takes a forecast (`expect`: which experts the next fetches will use, from the routing lookup,
lookup.py); while one lasts, `victim_for` evicts what it does not name first, by the policy's own order, else what
it names farthest ahead, and refuses a prefetch that would evict an expert wanted before the one prefetched.

- lru: the key used longest ago.
- lfu: the key used least often since start (counts outlive evictions: an expert's history is what predicts it),
  ties to the least recent.
- mar: the key whose expected next use is farthest away (Belady's MIN with the future estimated; the replay's
  bound, marserve/bench/expert_bound.py, is MIN with the real future). Layers are fetched in a cycle, one tick
  each, so a key of layer j is next wanted no sooner than its layer's next fetch, d ticks ahead (1..L; the layer
  just fetched: L), and then with probability p per fetch of its layer: expected distance d + L (1 - p) / p.
  p blends the key's decayed use count (half-life `half_life` ticks, one tick = one fetch of one layer, so
  ~`half_life / layers` decode steps) per decayed fetch of its layer with the prior: the layer's usage
  normalised to mean 1 (MAR's `usage`, or calibration) x the experts used per fetch / E. That blend is then
  calibrated online by recency: keys are grouped by their age (fetches of their layer since their last use:
  1, 2, 3, 4-5, 6-8, 9-16, 17-32, 33-64, 65+, never used), and each group's estimate is scaled by the uses
  the group really had per estimated use, counted at every fetch (decayed, half-life `calibration_half_life`
  ticks). Routing reuses an expert of the last token far more often than its average rate says (and one
  unused for many tokens far less), by an amount that depends on the model (8 experts top-2 or 128 top-8)
  and on the text; the calibration learns it instead of a fixed decay guessing it. A key with a pending
  prefetch prediction (until used, or `prediction_ttl` ticks) is kept ahead of any unpredicted one. Told no
  layer order (advance() without a layer), distance and calibration drop out: the lowest prior + decayed
  frequency goes. `mar` pins no experts by default (`pin_share`): the calibrated estimate keeps the hot ones,
  and pinned slots would be lost to the rest (docs/benchmarks.md, "Expert offloading").
"""

from __future__ import annotations

from bisect import bisect_right

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
        self.forecast: dict[int, dict[int, list[int]]] = {}  # layer -> expert -> ticks of its forecast uses
        self.forecast_until = 0  # the last tick any forecast reaches

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

    def expect(self, layer: int, uses: dict[int, list[int]]) -> None:
        """The forecast of one layer's experts, replacing the last: expert -> the fetches from now (1 = the next
        fetch of any layer) at which it will be used, ascending; {} forgets the layer's forecast."""
        if not uses:
            self.forecast.pop(layer, None)
            return
        now = self.tick
        self.forecast[layer] = {e: [now + d for d in ds] for e, ds in uses.items()}
        self.forecast_until = max(self.forecast_until, now + max(ds[-1] for ds in uses.values()))

    def next_forecast_use(self, key: Key) -> int | None:
        """The tick of key's next forecast use after the current fetch, or None (not forecast, or past)."""
        ticks = self.forecast.get(key[0], {}).get(key[1])
        if not ticks:
            return None
        i = bisect_right(ticks, self.tick)
        return ticks[i] if i < len(ticks) else None

    def victim_for(self, candidates: list[Key], incoming: Key | None = None) -> Key | None:
        """The key to evict for `incoming` (None: a fetch's miss, which must get a slot). Under a forecast: the
        policy's victim among candidates it does not name, else the one it names farthest ahead; None for a
        prefetch whose victim the forecast wants before `incoming` (or wants while `incoming` it does not)."""
        if self.forecast and self.tick > self.forecast_until:
            self.forecast.clear()
        if not self.forecast:
            return self.victim(candidates)
        forecast, ahead, unforeseen = self.forecast, {}, []
        for k in candidates:
            t = self.next_forecast_use(k) if k[1] in forecast.get(k[0], ()) else None
            if t is None:
                unforeseen.append(k)
            else:
                ahead[k] = t
        if unforeseen:
            return self.victim(unforeseen)
        key = max(ahead, key=ahead.__getitem__)
        if incoming is not None:
            wanted = self.next_forecast_use(incoming)
            if wanted is None or ahead[key] < wanted:
                return None
        return key

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


# Age groups of the calibration, in fetches of the key's layer since its last use (1 = used at the layer's last
# fetch): group g holds ages AGE_EDGES[g] <= age < AGE_EDGES[g + 1]; one more group for keys never used.
AGE_EDGES = (1, 2, 3, 4, 6, 9, 17, 33, 65)
NEVER_USED = len(AGE_EDGES)


class MARPolicy(EvictionPolicy):
    name = "mar"
    PREDICTED_BONUS = 1e6  # a pending prediction outranks any history (the fallback score without layer order)
    PRIOR_WEIGHT = 4.0  # the prior counts as this many fetches of the layer when p is estimated
    CALIBRATION_PSEUDO = 1.0  # each age group starts at ratio 1 with this many uses' worth of evidence

    def __init__(self, half_life: float = 32.0, prediction_ttl: int = 64, pin_share: float = 0.0,
                 num_layers: int = 1, calibration_half_life: float | None = 512.0):
        """calibration_half_life: ticks of memory of the age groups' ratios (None: no calibration, the blend
        alone, as before)."""
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
        # the calibration by age (only with layer order: ages count fetches of a layer)
        self.calibrated = calibration_half_life is not None
        self._table_fade = 0.5 ** (1.0 / calibration_half_life) if self.calibrated else 1.0
        self.estimated = [0.0] * (NEVER_USED + 1)  # per age group: summed estimates at the fetches of its keys
        self.used = [0.0] * (NEVER_USED + 1)  # per age group: uses
        self.layer_fetches: dict[int, int] = {}  # layer -> fetches so far
        self.last_fetch: dict[Key, int] = {}  # key -> its layer's fetch count at its last use
        self.seen: dict[int, set[int]] = {}  # layer -> experts used at least once
        self.unseen_prior: dict[int, float] = {}  # layer -> summed prior of its experts never used

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
            if self.calibrated:
                self._count_estimates(layer)

    def _age_group(self, key: Key) -> int:
        """key's age group at the current fetch of its layer."""
        at = self.last_fetch.get(key)
        return NEVER_USED if at is None else bisect_right(AGE_EDGES, self.layer_fetches[key[0]] - at) - 1

    def _count_estimates(self, layer: int) -> None:
        """A fetch of `layer` begins: add what the blend expects of each of its experts to its age group (the uses
        follow in on_access). Experts never used are summed through their prior, without a loop over them."""
        fade = self._table_fade
        self.estimated = [x * fade for x in self.estimated]
        self.used = [x * fade for x in self.used]
        self.layer_fetches[layer] = self.layer_fetches.get(layer, 0) + 1
        estimate, terms = self._estimator(calibrated=False), self._layer_terms(layer)
        count, last_fetch, estimated = self.layer_fetches[layer], self.last_fetch, self.estimated
        for e in self.seen.setdefault(layer, set()):  # inline _age_group: this runs for every used expert
            key = (layer, e)
            estimated[bisect_right(AGE_EDGES, count - last_fetch[key]) - 1] += estimate(key)[1]
        scores = self.prior.get(layer)
        if scores is not None:  # the blend of a never-used key: PRIOR_WEIGHT x its prior share, over the evidence
            unseen = self.unseen_prior.setdefault(layer, sum(scores))
            self.estimated[NEVER_USED] += self.PRIOR_WEIGHT * unseen * terms[2] / (terms[1] + self.PRIOR_WEIGHT)

    def on_access(self, key: Key, n: int = 1) -> None:
        # the use belongs to its layer's latest fetch even if another layer's began meanwhile (a fetch waiting for
        # a slot lets other threads in)
        if self.calibrated and key[0] in self.layer_fetches:
            count = self.layer_fetches[key[0]]
            if self.last_fetch.get(key) != count:  # the key's first access in this fetch
                self.used[self._age_group(key)] += 1
                if key[1] not in self.seen[key[0]]:
                    self.seen[key[0]].add(key[1])
                    if key[0] in self.unseen_prior:
                        self.unseen_prior[key[0]] -= self.prior_of(key)
                self.last_fetch[key] = count
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

    def calibration(self, group: int) -> float:
        """Uses per estimated use of an age group so far (1 with no evidence)."""
        return (self.used[group] + self.CALIBRATION_PSEUDO) / (self.estimated[group] + self.CALIBRATION_PSEUDO)

    def _estimator(self, calibrated: bool = True):
        """-> estimate(key) = (ticks to its layer's next fetch, chance that fetch uses it), with what depends only
        on the layer or the age group worked out once: a victim() scans the whole pool (6144 keys for Qwen3 at
        full size), so per key this is a few lookups and no calls. The chance: the key's decayed uses per decayed
        fetch of its layer, with the prior as PRIOR_WEIGHT fetches' worth of evidence (the blend), times its age
        group's calibration at that fetch (calibrated, once there is layer order)."""
        terms_of: dict[int, tuple[int, float, float]] = {}
        calibrations = [self.calibration(g) for g in range(NEVER_USED + 1)] \
            if calibrated and self.layer_fetches else None
        prior, freq, last_used, last_fetch = self.prior, self.freq, self.last_used, self.last_fetch
        fetch_counts, weight, tick, half_life = self.layer_fetches, self.PRIOR_WEIGHT, self.tick, self.half_life

        def estimate(key: Key) -> tuple[int, float]:
            layer, expert = key
            terms = terms_of.get(layer)
            if terms is None:
                terms = terms_of[layer] = self._layer_terms(layer)
            distance, fetches, per_expert = terms
            scores = prior.get(layer)
            prior_p = min(1.0, (scores[expert] if scores is not None else 1.0) * per_expert)
            f = freq.get(key)
            decayed = f * 0.5 ** ((tick - last_used[key]) / half_life) if f else 0.0
            p = (decayed + weight * prior_p) / (fetches + weight)
            if calibrations is None:
                return distance, p
            at = last_fetch.get(key)
            group = NEVER_USED if at is None else bisect_right(AGE_EDGES, fetch_counts[layer] + 1 - at) - 1
            return distance, min(1.0, p * calibrations[group])
        return estimate

    def use_probability(self, key: Key) -> float:
        """Estimated chance that the next fetch of key's layer uses key (see _estimator)."""
        return self._estimator()(key)[1]

    def expected_distance(self, key: Key) -> float:
        """Ticks until key is expected to be used: its layer's next fetch, then one cycle per expected miss."""
        return self._ranker()(key)[1]

    def _ranker(self):
        """-> rank(key) = (not pending, expected distance, -last use); the victim ranks highest. A pending prediction
        outranks any estimate: the prefetcher's guess is about this very token."""
        estimate, cycle, last_used = self._estimator(), self._cycle(), self.last_used
        predicted, tick, ttl = self.predicted, self.tick, self.prediction_ttl

        def rank(key: Key) -> tuple[bool, float, int]:
            distance, p = estimate(key)
            when = predicted.get(key)
            if when is not None and tick - when <= ttl:
                return False, distance, -last_used.get(key, -1)
            return True, distance + cycle * (1 - p) / p if p > 0 else float("inf"), -last_used.get(key, -1)
        return rank

    def victim(self, candidates: list[Key]) -> Key:
        if self.layer is None:
            return min(candidates, key=lambda k: (self.score(k), self.last_used.get(k, -1)))
        return max(candidates, key=self._ranker())

    def num_pinned(self, num_slots: int, min_slots: int) -> int:
        """pin_share of the slots beyond the minimum (none by default), and only with a prior to choose by: the
        minimum itself must stay evictable, or a step needing other experts could not run."""
        if not self.has_scores():
            return 0
        return int((num_slots - min_slots) * self.pin_share)


def make_policy(name: str, num_moe_layers: int = 1) -> EvictionPolicy:
    """The policy called `name` (one of POLICIES); mar's clock constants scale with the layers (ticks per step):
    its use counts halve every 4 decode steps (chosen among 4, 8, 16 on the replay's first traces; 8 before the
    calibration by age, which now sets the level of the estimate, so the half-life only ranks within an age
    group), its calibration every 16."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "mar":
        return MARPolicy(half_life=4.0 * num_moe_layers, prediction_ttl=2 * num_moe_layers, num_layers=num_moe_layers,
                         calibration_half_life=16.0 * num_moe_layers)
    raise ValueError(f"expert_policy {name!r} is not one of {', '.join(POLICIES)}")
