"""Trace replay: a model of a GPU serving an MoE with an expert cache, driven by recorded routing traces.

Nothing here runs a model: a routing trace (marserve/experts/traces.py) says which experts each token used
in each MoE layer, and this file plays those decisions against an expert cache of a given size holding the
experts of a real model (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite), with the missing experts copied in
over one link (PCIe 4.0 x16 from host RAM, or NVMe from disk), and adds up the time a batch-1 decode takes.

The time model (what `replay()` computes; stated again in docs/benchmarks.md, "Expert offloading"):
- Compute, per MoE layer: batch-1 decode on a GPU is bound by reading weights from its memory, so
  attention takes attention bytes / HBM bandwidth and the MoE part (K routed + shared experts) takes
  their bytes / HBM bandwidth, each plus a fixed launch overhead; per token, the LM head adds its bytes /
  HBM bandwidth. KV-cache reads are left out (short contexts).
- The cache: one pool of expert slots shared by every MoE layer, sized as the store sizes it (budget share x
  all experts, at least one decode step's K x L and one layer's E), filled at start by the policy's
  preference (usage prior: MAR usage or calibration; with none, expert index order), for every policy, the
  baseline included. Eviction uses the store's own policy objects (marserve/experts/policies.py), fed the
  same events the store feeds them (advance per layer fetch, insert, access, evict, predict); experts the
  policy pins (`num_pinned`: none by default) stay pinned as in the store. `per_layer=True` instead splits the budget evenly into one
  pool per layer (at least K each), the layout of mixtral-offloading's LRU cache: a second baseline.
- The link: one transfer at a time, expert bytes / link bandwidth each. A miss (an expert not in the pool
  when its layer routes) is copied at once, ahead of queued prefetches; the layer waits for all its
  experts (a stall). A prefetch is queued when a layer routes, for predicted experts of the next
  `lookahead` layers, and starts only when the link is free (it never delays a miss that comes later);
  a queued prefetch whose layer has routed is dropped. A prefetched expert still in flight when its layer
  routes is waited for (a shorter stall).
- Eviction never takes an expert the current layer uses, a pinned one, or (for a prefetch) one in flight or
  prefetched and not used yet (the prefetch is dropped instead, as the store does);
  a miss may evict a prefetch in flight (its link time is lost).

Legend: T=tokens, L=MoE layers, K=experts per token, E=experts per layer, D=lookahead layers,
M=experts predicted per lookahead layer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from marserve.bench.expert_bound import BeladyPolicy
from marserve.errors import ConfigError
from marserve.experts.policies import POLICIES, make_policy

@dataclass(frozen=True)
class ServedModel:
    """The expert sizes and counts of a real MoE (bf16), and the shape of the small model trained here to
    record its routing traces (same E and top-k; tiny hidden size)."""

    name: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate: int
    num_shared_experts: int
    attention_params: int  # per layer (q, k, v, o projections)
    lm_head_params: int
    bytes_per_param: int = 2
    proxy_arch: str = "qwen3_moe"  # `marserve train --arch` of the trace model
    proxy_note: str = ""

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate * self.bytes_per_param  # gate, up, down

    @property
    def total_expert_bytes(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_bytes


# Published configs (config.json of each checkpoint on the Hub), bf16.
SERVED_MODELS = {
    "mixtral-8x7b": ServedModel(
        "Mixtral-8x7B", num_moe_layers=32, num_experts=8, top_k=2, hidden_size=4096, expert_intermediate=14336,
        num_shared_experts=0, attention_params=4096 * (4096 + 2 * 1024) + 4096 * 4096, lm_head_params=32000 * 4096,
        proxy_arch="mixtral"),
    "qwen3-30b-a3b": ServedModel(
        "Qwen3-30B-A3B", num_moe_layers=48, num_experts=128, top_k=8, hidden_size=2048, expert_intermediate=768,
        num_shared_experts=0, attention_params=2048 * (4096 + 2 * 512) + 4096 * 2048, lm_head_params=151936 * 2048,
        proxy_arch="qwen3_moe"),
    # MLA attention (q 2048x3072, kv_a 2048x576, kv_b 512x4096, o 2048x2048); the first layer is dense and
    # left out. The trace model (qwen2_moe) has one shared expert, not two: shared experts are always
    # resident and never routed, so the trace is unaffected; the time model counts two.
    "deepseek-v2-lite": ServedModel(
        "DeepSeek-V2-Lite", num_moe_layers=26, num_experts=64, top_k=6, hidden_size=2048, expert_intermediate=1408,
        num_shared_experts=2, attention_params=2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048,
        lm_head_params=102400 * 2048, proxy_arch="qwen2_moe", proxy_note="one shared expert in the trace model"),
}


@dataclass(frozen=True)
class Hardware:
    """The modelled machine. The defaults: an RTX 4090-class GPU (~1 TB/s), PCIe 4.0 x16, a PCIe 4.0 NVMe."""

    hbm_gbs: float = 1000.0
    pcie_gbs: float = 25.0
    nvme_gbs: float = 7.0
    launch_overhead_s: float = 20e-6  # per attention or MoE part of a layer

    def link_gbs(self, tier: str) -> float:
        if tier == "host":
            return self.pcie_gbs
        if tier == "disk":  # NVMe -> host -> GPU, pipelined: the slower link sets the rate
            return min(self.nvme_gbs, self.pcie_gbs)
        raise ConfigError(f"tier must be 'host' or 'disk', got {tier!r}")


@dataclass(frozen=True)
class ReplayConfig:
    budget: float  # share of all expert bytes the cache holds
    policy: str = "lru"
    prefetch: bool = False
    lookahead: int = 2  # D: layers ahead predicted at each routing
    width: int | None = None  # M: experts prefetched per predicted layer (default K)
    tier: str = "host"
    per_layer: bool = False  # one pool per layer (mixtral-offloading's layout) instead of the store's shared pool

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise ConfigError(f"budget must be a share in (0, 1], got {self.budget}")
        if self.policy not in POLICIES + ("belady",):
            raise ConfigError(f"policy must be one of {POLICIES} or 'belady' (the offline bound), got {self.policy!r}")
        if self.policy == "belady" and self.prefetch:
            raise ConfigError("'belady' is the on-demand bound: it takes no prefetch")
        if self.lookahead < 1:
            raise ConfigError("lookahead must be >= 1 layer")


@dataclass
class ReplayResult:
    tokens: int = 0
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0
    compute_s: float = 0.0
    time_s: float = 0.0
    capacity: int = 0  # expert slots in all
    clamped: bool = False  # the budget was below the minimum (K x L, and E) and was raised to it

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 1.0

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.time_s / self.tokens if self.tokens else 0.0

    @property
    def precision(self) -> float:
        """prefetch_hits / prefetches: the share of prefetched experts used before eviction."""
        return self.prefetch_hits / self.prefetches if self.prefetches else 0.0

    @property
    def recall(self) -> float:
        """prefetch_hits / (prefetch_hits + misses): the share of would-be misses that a prefetch served."""
        return self.prefetch_hits / (self.prefetch_hits + self.misses) if self.prefetch_hits + self.misses else 0.0

    def row(self) -> dict:
        return {"tokens": self.tokens, "lookups": self.lookups, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hit_rate, "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits,
                "precision": self.precision, "recall": self.recall, "bytes_moved": self.bytes_moved,
                "stall_s": self.stall_s, "compute_s": self.compute_s, "time_s": self.time_s,
                "ms_per_token": self.ms_per_token, "capacity": self.capacity, "clamped": self.clamped}


@dataclass
class _Slot:
    ready_at: float  # when its bytes are in fast memory
    prefetched: bool = False  # copied by a prefetch and not used since


def replay(ids: np.ndarray, served: ServedModel, cfg: ReplayConfig, hw: Hardware = Hardware(),
           predictions: np.ndarray | None = None, usage: np.ndarray | None = None) -> ReplayResult:
    """Plays a routing trace against the modelled cache.

    ids [T, L, K] expert ids per token and MoE layer (L must equal served.num_moe_layers); predictions
    [T, L, D', M'] ids predicted at layer l for layer l+1+d, best first, -1 padded (needed with cfg.prefetch;
    the first cfg.lookahead and cfg.width of them are used); usage [L, E] the placement prior (None: every
    expert alike).
    """
    T, L, K = ids.shape
    E = served.num_experts
    if L != served.num_moe_layers or K != served.top_k:
        raise ConfigError(f"trace has {L} layers x top-{K} but {served.name} has {served.num_moe_layers} x "
                          f"top-{served.top_k}")
    if cfg.prefetch and predictions is None:
        raise ConfigError("prefetch needs predictions")
    # The store's sizing (marserve/experts/offloaded.py budget_for): a share of all L x E experts, at least one
    # step's K x L and one layer's E. per_layer: the same share split evenly, at least K per layer.
    total, minimum = L * E, min(L * E, max(K * L, E))
    if cfg.per_layer:
        capacity = max(K, int(cfg.budget * E + 1e-9))
        res = ReplayResult(capacity=capacity * L, clamped=cfg.budget * E < K)
    else:
        capacity = max(minimum, int(cfg.budget * total + 1e-9))
        res = ReplayResult(capacity=capacity, clamped=int(cfg.budget * total + 1e-9) < minimum)
    gbs = 1e9
    transfer_s = served.expert_bytes / (hw.link_gbs(cfg.tier) * gbs)
    attn_s = served.attention_params * served.bytes_per_param / (hw.hbm_gbs * gbs) + hw.launch_overhead_s
    moe_s = (K + served.num_shared_experts) * served.expert_bytes / (hw.hbm_gbs * gbs) + hw.launch_overhead_s
    head_s = served.lm_head_params * served.bytes_per_param / (hw.hbm_gbs * gbs)
    # belady: the offline bound (expert_bound.py), told the whole trace
    policy = BeladyPolicy(ids) if cfg.policy == "belady" else make_policy(cfg.policy, L)
    if usage is not None:
        for layer in range(L):
            policy.set_scores(layer, [float(u) for u in usage[layer]])
    pool_of = (lambda key: key[0]) if cfg.per_layer else (lambda key: 0)
    pools: dict[int, dict[tuple[int, int], _Slot]] = {p: {} for p in (range(L) if cfg.per_layer else [0])}
    order = policy.by_preference([(layer, e) for layer in range(L) for e in range(E)])
    hot = set() if cfg.per_layer else set(order[:policy.num_pinned(capacity, minimum)])
    for key in order:  # the initial resident set: the policy's preference (usage prior) until each pool is full
        if len(pools[pool_of(key)]) < capacity:
            pools[pool_of(key)][key] = _Slot(ready_at=0.0)
            policy.on_insert(key)
    width = cfg.width or K
    queue: deque = deque()  # queued prefetches: (target position t*L+l, key, issued at)
    queued: set[tuple[int, tuple[int, int]]] = set()
    link_free = 0.0
    now = 0.0

    def claim(pool: dict, keep: set, in_flight_ok: bool, at: float) -> bool:
        """Make room in a full pool: evict the policy's victim among the slots that may go -> False if none."""
        if len(pool) < capacity:
            return True
        candidates = [k for k, s in pool.items()
                      if k not in keep and k not in hot and (in_flight_ok or s.ready_at <= at)]
        if not candidates:
            return False
        victim = policy.victim(candidates)
        if not in_flight_ok and pool[victim].prefetched:
            return False  # as the store: a prefetch does not displace an earlier one not used yet
        del pool[victim]
        policy.on_evict(victim)
        return True

    def start_queued(pos_now: int, until: float) -> None:
        """Start queued prefetches in order while the link frees up before `until` (a miss at `until` goes
        first after that)."""
        nonlocal link_free
        while queue and link_free < until:
            pos, key, issued = queue[0]
            start = max(link_free, issued)
            if start >= until:
                break
            queue.popleft()
            queued.discard((pos, key))
            pool = pools[pool_of(key)]
            if pos <= pos_now or key in pool:
                continue  # its layer has routed already, or an earlier prefetch brought it
            if not claim(pool, set(), in_flight_ok=False, at=start):
                continue
            link_free = start + transfer_s
            pool[key] = _Slot(ready_at=link_free, prefetched=True)
            policy.on_insert(key)
            res.prefetches += 1
            res.bytes_moved += served.expert_bytes

    routed = ids.tolist()  # plain ints: numpy scalars per element cost more than the replay itself
    predicted = predictions.tolist() if cfg.prefetch else None
    for t in range(T):
        for layer in range(L):
            pos = t * L + layer
            now += attn_s  # attention, then the router decides
            start_queued(pos - 1, now)
            policy.advance(layer)
            needed = [(layer, e) for e in routed[t][layer]]
            keep = set(needed)
            ready = now
            for key in needed:
                res.lookups += 1
                pool = pools[pool_of(key)]
                slot = pool.get(key)
                if slot is not None:
                    res.hits += 1
                    if slot.prefetched:
                        res.prefetch_hits += 1
                        slot.prefetched = False
                else:
                    res.misses += 1
                    claim(pool, keep, in_flight_ok=True, at=now)  # may cancel a prefetch in flight (link time lost)
                    link_free = max(now, link_free) + transfer_s
                    slot = pool[key] = _Slot(ready_at=link_free)
                    policy.on_insert(key)
                    res.bytes_moved += served.expert_bytes
                policy.on_access(key)
                ready = max(ready, slot.ready_at)
            if cfg.prefetch:
                for d in range(min(cfg.lookahead, len(predicted[t][layer]))):
                    target = layer + 1 + d
                    if target >= L:
                        break
                    for e in predicted[t][layer][d][:width]:
                        if e < 0:
                            break  # fewer predictions than width (-1 pads)
                        key = (target, e)
                        policy.on_predict(key)
                        item = (t * L + target, key)
                        if key not in pools[pool_of(key)] and item not in queued:
                            queue.append((item[0], key, now))
                            queued.add(item)
            res.stall_s += ready - now
            now = ready + moe_s
            res.compute_s += attn_s + moe_s
        now += head_s
        res.compute_s += head_s
        res.tokens += 1
    res.time_s = now
    return res
