"""What one eviction decision costs: `victim()` (and the per-fetch bookkeeping) of each policy on a full pool.

The store asks its policy for a victim on the decode path, once per miss, among every evictable resident key, so
its cost per call on a large pool is what a policy change must not blow up. This drives each policy with a
synthetic routing of Qwen3-30B-A3B's shape (48 MoE layers x 128 experts, top-8; every key resident: 6144
candidates, the worst case) for a few warm-up steps, then times victim() over the whole pool and the events of one
layer fetch (advance + top-k accesses), and prints the figures with the command and the host. With the routing
lookup's forecast (lookup.py) the store calls victim_for() instead: timed too, under a forecast of 4 steps of that
routing, with what a decode step pays to make the forecast and hand it to every layer (`forecast step`).

    python -m marserve.bench.policy_cost [--layers 48 --experts 128 --top-k 8 --steps 32 --calls 200]

Legend: L=MoE layers, E=experts per layer, K=experts per token.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

from marserve.bench.provenance import print_provenance
from marserve.experts.lookup import RoutingLookup, forecast_uses
from marserve.experts.policies import POLICIES, make_policy


def measure(name: str, layers: int, experts: int, top_k: int, steps: int, calls: int, seed: int = 0) -> dict:
    """-> {"victim_us": per victim() call over all L x E keys, "fetch_us": per advance() + K on_access(),
    "forecast_victim_us": per victim_for() call under a forecast, "forecast_step_us": a decode step's forecast made
    and handed to every layer}."""
    rng = random.Random(seed)
    policy = make_policy(name, layers)
    for layer in range(layers):  # a skewed prior, as MAR usage is
        policy.set_scores(layer, [1.0 / (1 + e) for e in rng.sample(range(experts), experts)])
    keys = [(layer, e) for layer in range(layers) for e in range(experts)]
    for key in keys:
        policy.on_insert(key)
    # routing with some reuse from step to step: half of each layer's experts repeat the last step's
    last = {layer: rng.sample(range(experts), top_k) for layer in range(layers)}
    fetch_s, fetches = 0.0, 0
    for _ in range(steps):
        for layer in range(layers):
            used = last[layer][: top_k // 2] + rng.sample(range(experts), top_k - top_k // 2)
            used = list(dict.fromkeys(used))
            last[layer] = used
            t0 = time.perf_counter()
            policy.advance(layer)
            for e in used:
                policy.on_access((layer, e))
            fetch_s += time.perf_counter() - t0
            fetches += 1
    t0 = time.perf_counter()
    for _ in range(calls):
        policy.victim(keys)
    victim_s = time.perf_counter() - t0
    step_s, forecast_s = _forecast_cost(policy, keys, layers, experts, top_k, rng, calls)
    return {"policy": name, "keys": len(keys), "victim_us": 1e6 * victim_s / calls, "fetch_us": 1e6 * fetch_s / fetches,
            "forecast_victim_us": 1e6 * forecast_s, "forecast_step_us": 1e6 * step_s}


def _forecast_cost(policy, keys, layers: int, experts: int, top_k: int, rng: random.Random, calls: int
                   ) -> tuple[float, float]:
    """(seconds of one decode step's forecast: lookup, fetch distances, expect() on every layer; seconds of one
    victim_for() under it). A sequence looping over 8 tokens, so that every step has a match."""
    lookup = RoutingLookup(layers, top_k, horizon=4)
    routing = {t: np.array([rng.sample(range(experts), top_k) for _ in range(layers)]) for t in range(8)}
    tokens = list(range(8)) * 4
    for pos, t in enumerate(tokens):  # the loop recorded once round, and more
        lookup.begin_pass(["s"], [[t]], [pos], [pos == 0])
        for i in range(layers):
            lookup.record(i, routing[t][i][None, :])
    warm, steps = 8, 24
    for k in range(warm + steps):
        if k == warm:
            t0 = time.perf_counter()
        found = lookup.begin_pass(["s"], [[tokens[k % 8]]], [len(tokens) + k], [False])
        for i, uses in enumerate(forecast_uses(found, layers)):
            policy.expect(i, uses)
        for i in range(layers):
            lookup.record(i, routing[tokens[k % 8]][i][None, :])
    step_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(calls):
        policy.victim_for(keys)
    return step_s, (time.perf_counter() - t0) / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m marserve.bench.policy_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32, help="decode steps of warm-up routing before the timing")
    ap.add_argument("--calls", type=int, default=200, help="victim() calls timed")
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    print(f"{'policy':<6} {'keys':>6} {'victim() us/call':>17} {'fetch events us':>16} "
          f"{'victim_for() under a forecast':>30} {'forecast step us':>17}")
    for name in args.policies.split(","):
        r = measure(name, args.layers, args.experts, args.top_k, args.steps, args.calls)
        print(f"{r['policy']:<6} {r['keys']:>6} {r['victim_us']:17.0f} {r['fetch_us']:16.1f} "
              f"{r['forecast_victim_us']:30.0f} {r['forecast_step_us']:17.0f}")
    print_provenance("marserve.bench.policy_cost", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
