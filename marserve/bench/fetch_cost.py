"""What an offloaded layer's fetch costs when every expert it needs is resident: the decode path's fixed price.

A decode step calls `OffloadedExperts.fetch(topk_ids)` once per MoE layer: count the routing ids, let the store pin
their slots (and tell the policy), remap the ids to slots. With every expert resident no read happens, so what is
left is this bookkeeping, paid by every token of an offloaded model however good the cache is. This loads a model
with an expert cache, picks in each MoE layer experts that are resident, and times fetch() over the layers in turn
(as a decode step does), and the store's part alone, printing both with the command and the host.

    python -m marserve.bench.fetch_cost [--model DIR] [--expert-cache 0.25] [--tokens 1] [--calls 2000]

Legend: K=experts per token.
"""

from __future__ import annotations

import argparse
import sys
import time

from marserve.bench.provenance import print_provenance


def measure(model_dir: str, expert_cache: float, tokens: int, calls: int, policy: str = "mar") -> dict:
    """-> {"fetch_us": one provider fetch(), "store_us": the store's part of it, "layers": layers timed}."""
    import torch

    from marserve.loader import load_model
    model, _ = load_model(model_dir, expert_cache=expert_cache, expert_policy=policy)
    store = model.expert_store
    if store is None:
        raise SystemExit(f"{model_dir} at expert_cache={expert_cache} keeps every expert resident: nothing to time")
    try:
        resident = store.resident_keys()
        top_k = model.moe_blocks()[0].top_k
        work = []  # (block, topk_ids [tokens, K], counts) of the layers with top_k resident experts
        for block in model.moe_blocks():
            here = sorted(e for layer, e in resident if layer == block.layer_idx)[:top_k]
            if len(here) == top_k:
                ids = torch.tensor([here] * tokens)
                work.append((block, ids, {e: tokens for e in here}))
        if not work:
            raise SystemExit("no MoE layer has top-k experts resident at this budget: raise --expert-cache")
        rounds = max(1, calls // len(work))
        for _ in range(50):  # warm-up
            for block, ids, _counts in work:
                block.experts.fetch(ids)
        start = time.perf_counter()
        for _ in range(rounds):
            for block, ids, _counts in work:
                block.experts.fetch(ids)
        fetch_s = (time.perf_counter() - start) / (rounds * len(work))
        start = time.perf_counter()
        for _ in range(rounds):
            for block, _ids, counts in work:
                store.fetch(block.layer_idx, counts)
        store_s = (time.perf_counter() - start) / (rounds * len(work))
        return {"fetch_us": fetch_s * 1e6, "store_us": store_s * 1e6, "layers": len(work)}
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    from marserve import DEFAULT_MODEL_DIR
    p = argparse.ArgumentParser(prog="python -m marserve.bench.fetch_cost", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--expert-cache", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=1, help="tokens per fetch (1: a batch-1 decode step)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--policy", default="mar")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    best = None
    for _ in range(args.repeats):
        r = measure(args.model, args.expert_cache, args.tokens, args.calls, args.policy)
        best = r if best is None or r["fetch_us"] < best["fetch_us"] else best
    print(f"all-hit fetch, {args.tokens} token(s), policy {args.policy}, {best['layers']} layers: "
          f"{best['fetch_us']:.1f} us per layer (the store's part {best['store_us']:.1f} us), best of {args.repeats}")
    print_provenance("marserve.bench.fetch_cost", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
