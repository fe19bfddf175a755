"""Where an offloaded run's time goes, request by request: compute, stall, and what the disk did meanwhile.

`marserve bench experts` gives totals; this answers the next question, whether the reads are hidden as well as the
disk allows. It loads a model with an expert cache (page cache dropped first), generates each bench prompt greedily
one after the other, and times every expert read (landing in its slot, on whatever thread) and every fetch that
waited, by wrapping this store's own methods. Per request it prints: wall time; stall (fetches waiting for reads);
compute (the rest); reads, of them prefetches; disk busy (time with some read in flight); and disk idle while the
model computed (neither reading nor waiting): what a perfect schedule could still hide. A disk busy for nearly
the whole wall, with little idle time, means the reads and not their timing set the speed. The prefill (up to the
first token) is shown apart: its reads come before any compute that could hide them.

    python -m marserve.bench.expert_timeline [--model DIR] [--expert-cache 0.25] [--policy mar] [--prompts 2]
        [--tokens 32] [--no-prefetch]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from marserve.bench.provenance import print_provenance


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of [start, end) spans."""
    total, start, end = 0.0, None, None
    for a, b in sorted(spans):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    return total + (end - start if end is not None else 0.0)


def _record(store, reads: list, waits: list) -> None:
    """Wrap this store's read and fetch (instance attributes: the class and other stores stay as they are)."""
    lock = threading.Lock()
    load, fetch = store._load, store.fetch

    def timed_load(key, slot, prefetched):
        start = time.perf_counter()
        try:
            return load(key, slot, prefetched)
        finally:
            with lock:
                reads.append((start, time.perf_counter(), prefetched))

    def timed_fetch(layer, counts):
        stalled = store.stats[layer].stall_seconds
        start = time.perf_counter()
        out = fetch(layer, counts)
        if store.stats[layer].stall_seconds > stalled:
            with lock:
                waits.append((start, time.perf_counter()))
        return out
    store._load, store.fetch = timed_load, timed_fetch


def measure(model_dir: str, expert_cache: float, policy: str, prompts: list[str], tokens: int,
            prefetch: bool = True) -> list[dict]:
    """-> per request: {"wall_s", "stall_s", "compute_s", "reads", "prefetched", "disk_busy_s", "idle_s", and the
    prefill's share (up to the first token): "prefill_s", "prefill_stall_s", "prefill_reads"}."""
    from marserve.bench.expert_live import drop_page_cache
    from marserve.llm import LLM
    from marserve.sampling_params import SamplingParams

    drop_page_cache(Path(model_dir), global_drop=False)
    llm = LLM(model_dir, expert_cache=expert_cache, expert_policy=policy, prefetch=prefetch, kv_cache_gb=0.25,
              enable_prefix_caching=False)
    store = llm.engine.expert_store
    if store is None:
        raise SystemExit(f"{model_dir} at expert_cache={expert_cache} keeps every expert resident: nothing to time")
    reads, waits = [], []
    _record(store, reads, waits)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    out = []
    for prompt in prompts:
        ids = llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start, wall_clock = time.perf_counter(), time.time()
        done = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        end = time.perf_counter()
        first = done.metrics.first_token_time  # wall-clock time of the first token: the prefill's end
        first = end if first is None else start + (first - wall_clock)
        while store.in_use()[0]:  # prefetches still landing belong to this request
            time.sleep(0.001)
        mine = [(a, min(b, end), pf) for a, b, pf in reads if start <= a < end]
        stalls = [(a, b) for a, b in waits if start <= a < end]
        stall = sum(b - a for a, b in stalls)
        busy = covered([(a, b) for a, b, _ in mine])
        out.append({"wall_s": end - start, "stall_s": stall, "compute_s": end - start - stall, "reads": len(mine),
                    "prefetched": sum(pf for _, _, pf in mine), "disk_busy_s": busy,
                    "idle_s": end - start - covered([(a, b) for a, b, _ in mine] + stalls),
                    "prefill_s": first - start, "prefill_stall_s": sum(b - a for a, b in stalls if a < first),
                    "prefill_reads": sum(a < first for a, _, _ in mine)})
    store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from marserve import DEFAULT_MODEL_DIR
    from marserve.bench.experts import PROMPTS
    p = argparse.ArgumentParser(prog="python -m marserve.bench.expert_timeline", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--expert-cache", type=float, default=0.25)
    p.add_argument("--policy", default="mar")
    p.add_argument("--prompts", type=int, default=2, help=f"the first N of the bench's {len(PROMPTS)} prompts")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--no-prefetch", action="store_true")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    rows = measure(args.model, args.expert_cache, args.policy, PROMPTS[:args.prompts], args.tokens,
                   prefetch=not args.no_prefetch)
    print(f"{'request':>7} {'wall s':>7} {'compute':>7} {'stall':>7} {'reads':>5} {'prefetched':>10} "
          f"{'disk busy':>9} {'idle while computing':>20} | {'prefill s':>9} {'its stall':>9} {'its reads':>9}")
    for i, r in enumerate(rows):
        print(f"{i:>7} {r['wall_s']:7.3f} {r['compute_s']:7.3f} {r['stall_s']:7.3f} {r['reads']:5d} "
              f"{r['prefetched']:10d} {r['disk_busy_s']:9.3f} {r['idle_s']:20.3f} | {r['prefill_s']:9.3f} "
              f"{r['prefill_stall_s']:9.3f} {r['prefill_reads']:9d}")
    print_provenance("marserve.bench.expert_timeline", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
