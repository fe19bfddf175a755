"""Live expert-offloading runs: one configuration (model, budget, policy, prefetch) per fresh process.

The parent (`marserve bench experts`) calls `run_config()`, which drops the page cache, starts
`python -m marserve.bench.expert_live '<json spec>'` and reads back one JSON line. The child builds
`LLM(model, expert_cache=, expert_policy=, prefetch=)`, generates greedily from fixed prompts at batch 1 (one
prompt after another), and reports tokens/s, the expert stores' counters summed over the MoE layers, peak RSS (VmHWM)
and a digest of the generated tokens (equal digests = identical greedy outputs).

A fresh process per configuration, because peak RSS is a process-lifetime figure and the store's resident set,
policy state and the page cache must start cold for each.

Definitions (from ExpertCacheStats summed over layers): precision = prefetch_hits / prefetches (share of
prefetched experts used before eviction); recall = prefetch_hits / (prefetch_hits + misses) (share of the
experts that were not resident when first wanted this time which a prefetch had brought in); a miss is a
routing decision whose expert had to be read synchronously.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_page_cache(model_dir: Path, global_drop: bool) -> str:
    """Evict the model's files from the page cache -> how it was done (for the report).

    posix_fadvise(DONTNEED) on every file of the checkpoint always (enough for the store's reads, and harmless
    to other processes); with global_drop also `echo 1 > /proc/sys/vm/drop_caches` when writable (root)."""
    for path in Path(model_dir).iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    how = "posix_fadvise(DONTNEED) on the model's files"
    if global_drop and os.access(DROP_CACHES, os.W_OK):
        os.sync()
        try:
            with open(DROP_CACHES, "w") as f:
                f.write("1")
            how = "sync; echo 1 > /proc/sys/vm/drop_caches (and posix_fadvise on the model's files)"
        except OSError:
            pass
    return how


def run_config(spec: dict, global_drop: bool, timeout_s: float = 3600.0) -> dict:
    """One configuration in a fresh process -> its report (or {"error": ...} with the child's last words)."""
    dropped = drop_page_cache(Path(spec["model"]), global_drop)
    env = dict(os.environ)
    env.setdefault("GOMP_SPINCOUNT", "10000")  # as the CLI sets it (marserve/cli.py)
    proc = subprocess.run([sys.executable, "-m", "marserve.bench.expert_live", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "error": tail, "page_cache": dropped}
    return {**json.loads(lines[-1]), "page_cache": dropped}


def expert_bytes_of(config, dtype) -> tuple[int, int]:
    """(bytes of one expert in `dtype`, number of routed experts in all MoE layers)."""
    import torch
    L = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    one = 3 * config.hidden_size * config.moe_intermediate_size * torch.empty((), dtype=dtype).element_size()
    return one, L * config.num_experts


def _child(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    from marserve import LLM
    from marserve.sampling_params import SamplingParams
    from marserve.bench.read_needs import ReadNeeds
    t0 = time.perf_counter()
    llm = LLM(spec["model"], dtype=spec["dtype"], expert_cache=spec["expert_cache"], expert_policy=spec["policy"],
              prefetch=spec["prefetch"], kv_cache_gb=0.25, enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    if llm.engine.prefetcher is not None and (spec.get("prefetch_lookahead") or spec.get("prefetch_min_prob")):
        _replace_prefetcher(llm, spec.get("prefetch_lookahead"), spec.get("prefetch_min_prob"))
    temperature = spec.get("temperature", 0.0)  # above 0: sampled, one fixed seed per prompt (same text every run)
    params = [SamplingParams(max_tokens=spec["tokens"], temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(spec["prompts"]))]
    prompts = [llm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in spec["prompts"]]
    recorder = None
    store = llm.engine.expert_store  # None when every expert is resident
    if store is not None and not spec["prefetch"]:  # on demand: count MIN too
        from marserve.experts.traces import TraceRecorder
        recorder = TraceRecorder(llm.model).install()
    llm.generate({"prompt_token_ids": prompts[0][:4]}, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    # The load leaves the cyclic collector owing a full pass over the ~340,000 objects it created (~0.12 s here),
    # and this process's own records (each read's need, the routing trace) add enough objects for it to come due
    # inside a measured request: a 0.13-0.17 s prefill where the others took 0.02 s. Take it now. (A one-off check
    # with these records off ran 24 requests without a full pass.)
    gc.collect()
    warm_passes = recorder.num_passes if recorder is not None else 0
    blocks = llm.model.moe_blocks()
    before = _summed(blocks)  # the warm-up's counters are left out
    digest, generated, t0 = hashlib.sha256(), 0, time.perf_counter()
    decode_tokens, decode_s = 0, 0.0  # after each request's first token: what llama-bench's tg measures
    requests = []  # per request: its seconds, stall and bytes read, and the prefill's (what an overlap bound needs)
    first_token = _mark_first_token(llm.engine, blocks)
    needs = ReadNeeds(store).install() if store is not None else None  # when each read was needed
    for ids, sampling in zip(prompts, params):  # batch 1: one request at a time
        first_token.clear()
        if needs is not None:
            needs.begin()
        start, counters = time.perf_counter(), _summed(blocks)
        out = llm.generate({"prompt_token_ids": ids}, sampling, use_tqdm=False)[0]
        end, after = time.perf_counter(), _summed(blocks)
        prefill = first_token or {"at": end, **after}
        requests.append({"seconds": end - start, "stall_s": after["stall_s"] - counters["stall_s"],
                         "bytes_read": after["bytes_read"] - counters["bytes_read"],
                         "prefill_s": prefill["at"] - start,
                         "prefill_stall_s": prefill["stall_s"] - counters["stall_s"],
                         "prefill_bytes_read": prefill["bytes_read"] - counters["bytes_read"],
                         **({"needs": needs.end()} if needs is not None else {})})
        toks = out.outputs[0].token_ids
        digest.update(json.dumps(toks).encode())
        generated += len(toks)
        m = out.metrics
        if m is not None and m.first_token_time is not None and m.last_token_time is not None and len(toks) > 1:
            decode_tokens += len(toks) - 1
            decode_s += m.last_token_time - m.first_token_time
    elapsed = time.perf_counter() - t0
    now = _summed(blocks)
    totals = {k: now[k] - before[k] for k in before}
    offline = _offline_reads(llm.model, recorder, warm_passes, spec["policy"]) if recorder is not None else {}
    one, total = expert_bytes_of(llm.config, next(blocks[0].parameters(), torch.empty(0)).dtype
                                 if spec["dtype"] == "auto" else getattr(torch, spec["dtype"]))
    return {**spec, **totals, "generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
            "load_s": load_s, "peak_rss_bytes": peak_rss_bytes(), "requests": requests, **offline,
            "expert_bytes": one, "num_experts_total": total, "output_digest": digest.hexdigest()[:16],
            "offloading": type(blocks[0].experts).__name__,
            "prefetcher": type(llm.engine.prefetcher).__name__ if llm.engine.prefetcher is not None else None,
            "predictor": llm.engine.prefetcher.predictor.name if llm.engine.prefetcher is not None else None,
            **_prefetcher_settings(llm.engine.prefetcher)}


def _mark_first_token(engine, blocks) -> dict:
    """Wrap engine.step so that the returned dict, once cleared, gets {"at": perf_counter, **_summed(blocks)} at
    the end of the first step that gives a request a token (at batch 1: the prefill's end)."""
    mark: dict = {}
    step = engine.step

    def step_and_mark():
        outputs = step()
        if not mark and any(o.outputs and o.outputs[0].token_ids for o in outputs):
            mark.update(at=time.perf_counter(), **_summed(blocks))
        return outputs
    engine.step = step_and_mark
    return mark


def _prefetcher_settings(pf) -> dict:
    if pf is None:
        return {}
    out = {"prefetcher_lookahead": pf.predictor.lookahead, "prefetcher_min_prob": pf.min_prob,
           "prefetcher_adaptive": pf.adaptive}
    if pf.lookup is not None:  # the routing lookup: decode steps forecast, and how often the forecast came true
        out.update(lookup_steps=pf.lookup.steps, lookup_forecasts=pf.lookup.forecasts,
                   lookup_precision=round(pf.lookup.precision(), 4), forecast_read_steps=pf.num_forecast_passes)
    return out


def _replace_prefetcher(llm, lookahead: int | None, min_prob: float | None) -> None:
    """The engine's prefetcher swapped for one with these knobs (None: the default); a given min_prob is a fixed
    threshold at every distance, not the adaptive one."""
    from marserve.experts.preferences import load_preferences
    from marserve.experts.prefetcher import Prefetcher
    llm.engine.prefetcher.uninstall()
    kw = {"lookahead": lookahead} if lookahead else {}
    if min_prob is not None:
        kw.update(min_prob=min_prob, adaptive=False)
    llm.engine.prefetcher = Prefetcher(llm.model, load_preferences(llm.engine.config.model, llm.model), **kw).install()


def _offline_reads(model, recorder, warm_passes: int, policy_name: str) -> dict:
    """The run's routing (warm-up included) replayed through the store's on-demand path: with the run's policy
    (`replayed_reads`, a check: the run read as many) and with Belady's MIN (`min_reads`, the fewest any eviction
    can read on this pool, these requests and this initial set), reads after the warm-up."""
    from marserve.bench.expert_bound import BeladyPolicy, demand_reads, store_fetches
    from marserve.experts.policies import make_policy
    recorder.uninstall()
    trace = recorder.trace()
    store = model.expert_store
    fetches = store_fetches(trace.topk_ids, trace.step, trace.layer_ids)
    counted_from = warm_passes * len(trace.layer_ids)
    layer0 = trace.layer_ids[0]
    out = {"expert_file_bytes": store.index.file_bytes(layer0, 0)}  # one expert's bytes as read (the file's dtype)
    for field, policy in (("replayed_reads", make_policy(policy_name, len(trace.layer_ids))),
                          ("min_reads", BeladyPolicy.over_fetches(fetches))):
        for layer, usage in store.policy.prior.items():  # the run's usage prior, as the store set it
            policy.set_scores(layer, usage)
        out[field] = demand_reads(fetches, policy, store.num_slots, store.index.keys, counted_from)
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over exec() from
    the process that forked us (the parent's 1 GB bandwidth probe showed up as every run's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _summed(blocks) -> dict:
    """The stores' counters summed over the MoE layers."""
    per_layer = [_counters(b.experts.stats) for b in blocks]
    return {k: sum(c[k] for c in per_layer) for k in per_layer[0]}


def _counters(stats) -> dict:
    return {"lookups": stats.lookups, "hits": stats.hits, "misses": stats.misses, "prefetches": stats.prefetches,
            "prefetch_hits": stats.prefetch_hits, "bytes_read": stats.bytes_moved,
            "stall_s": stats.stall_seconds}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
