"""What one eviction decision costs: `victim()` (and the per-fetch bookkeeping) of each policy on a full pool.

The store asks its policy for a victim on the decode path, once per miss, among every evictable resident key, so
its cost per call on a large pool is what a policy change must not blow up. This drives each policy with a
synthetic routing of Qwen3-30B-A3B's shape (48 MoE layers x 128 experts, top-8; every key resident: 6144
candidates, the worst case) for a few warm-up steps, then times victim() over the whole pool and the events of one
layer fetch (advance + top-k accesses), and prints the figures with the command and the host.

    python -m marserve.bench.policy_cost [--layers 48 --experts 128 --top-k 8 --steps 32 --calls 200]

Legend: L=MoE layers, E=experts per layer, K=experts per token.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from marserve.experts.policies import POLICIES, make_policy


def measure(name: str, layers: int, experts: int, top_k: int, steps: int, calls: int, seed: int = 0) -> dict:
    """-> {"victim_us": per victim() call over all L x E keys, "fetch_us": per advance() + K on_access()}."""
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
    return {"policy": name, "keys": len(keys), "victim_us": 1e6 * victim_s / calls, "fetch_us": 1e6 * fetch_s / fetches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m marserve.bench.policy_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32, help="decode steps of warm-up routing before the timing")
    ap.add_argument("--calls", type=int, default=200, help="victim() calls timed")
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    from marserve_kernels import cpu_features
    print(f"{'policy':<6} {'keys':>6} {'victim() us/call':>17} {'fetch events us':>16}")
    for name in args.policies.split(","):
        r = measure(name, args.layers, args.experts, args.top_k, args.steps, args.calls)
        print(f"{r['policy']:<6} {r['keys']:>6} {r['victim_us']:17.0f} {r['fetch_us']:16.1f}")
    print("command: python -m marserve.bench.policy_cost " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"host: {cpu_features.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
