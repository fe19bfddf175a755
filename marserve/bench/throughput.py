"""`marserve bench throughput`: offline generation tokens/s of marserve and transformers, side by side.

Same model, same prompts, same number of generated tokens (greedy, EOS ignored), same threads, in one
run; best of --repeats, the two engines alternating within each repeat (the host is shared and noisy).
Prints the machine's measured limits and, for batch-1 decode, the roofline: bytes of weights one decode
token reads / memory bandwidth. The bandwidth is read again just before and after each marserve run, and
the share is given both against that reading (the limit of the same moment) and against the best
bandwidth seen anywhere in the run (the conservative figure).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from marserve import progress
from marserve.bench.machine_limits import BandwidthProbe, measure

BENCH_MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_local_experts=16,
                   num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                   max_position_embeddings=4096)


def _model_dir(name: str) -> Path:
    from marserve import DEFAULT_MODEL_DIR
    if name == "default":
        return DEFAULT_MODEL_DIR
    if name != "bench":
        return Path(name)
    path = Path(tempfile.gettempdir()) / "marserve-bench-mixtral"
    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        from transformers import MixtralConfig, MixtralForCausalLM
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(**BENCH_MODEL)).save_pretrained(path)
        # The benchmark feeds token ids, but the engine loads a tokenizer: borrow the shipped one's files.
        from marserve import DEFAULT_MODEL_DIR
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / f).write_bytes((DEFAULT_MODEL_DIR / f).read_bytes())
    return path


def _workload(name: str, vocab: int, quick: bool, repeat: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, tokens to generate) per request. Lengths are fixed; the token ids differ with `repeat`, so
    that a repeat does not find the previous one's prompts in marserve's prefix cache."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.Generator().manual_seed(1000 + repeat)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=tokens).tolist()  # noqa: E731
    if name == "batch1":
        return [(rand(16), 32 if quick else 128)]
    if name == "16x128":
        return [(rand(128), 32 if quick else 128) for _ in range(16)]
    if name == "mixed64":
        n = 8 if quick else 64
        lens = torch.randint(32, 513, (n,), generator=g).tolist()
        outs = torch.randint(32, 257, (n,), generator=g).tolist()
        return [(rand(i), o) for i, o in zip(lens, outs)]
    raise SystemExit(f"unknown workload {name!r}")


def _run_marserve(llm, work) -> float:
    from marserve import SamplingParams
    prompts = [{"prompt_token_ids": p} for p, _ in work]
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in work]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)  # timed: the caller's bar counts whole runs
    dt = time.perf_counter() - t0
    assert sum(len(o.outputs[0].token_ids) for o in outs) == sum(o for _, o in work)
    return sum(o for _, o in work) / dt


def _prefix_ttft(llm, vocab: int) -> tuple[float, float]:
    """TTFT (one output token) of a request with a fresh 400-token prefix, then of another with the same prefix."""
    from marserve import SamplingParams
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, vocab, (400,), generator=g).tolist()
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for suffix in (torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(2)):
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prefix + suffix}], one, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def _run_hf(model, work) -> float:
    """transformers generate with its defaults; one padded batch per distinct output length."""
    total, t0 = 0, time.perf_counter()
    by_len: dict[int, list[list[int]]] = {}
    for p, o in work:
        by_len.setdefault(o, []).append(p)
    for o, prompts in by_len.items():
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=o, min_new_tokens=o,
                                 do_sample=False, pad_token_id=0)
        total += (out.shape[1] - width) * len(prompts)
    return total / (time.perf_counter() - t0)


def _decode_bytes(model) -> int:
    """Weight bytes one batch-1 decode token reads: everything but the embedding table and the unused experts.
    Works on marserve's model and on transformers' (the same parameter names where it matters)."""
    cfg = model.config
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        total += model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    return int(total - expert + expert * cfg.num_experts_per_tok / cfg.num_experts)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from marserve import LLM
    path = _model_dir(args.model)
    with progress.stage("bench throughput: measuring the machine's limits"):
        limits = measure()
    print(f"machine: {limits.describe()}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    from marserve.commands.expert_flags import expert_kwargs
    llms = {d: LLM(path, dtype=d, kv_cache_gb=2.0, max_num_seqs=64, max_num_batched_tokens=2048,
                   **expert_kwargs(args)) for d in dtypes}
    llm = llms[dtypes[0]]
    # transformers in fp32: its strongest form on a CPU (its bf16 matmuls are slower wherever oneDNN lacks bf16).
    # (no stage line: transformers prints its own load report, which would split it)
    hf = None if args.skip_hf else AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # Warm-up, untimed: the first decode pass builds marserve's native kernels (seconds, once per machine).
    warm = [(list(range(1, 9)), 4), (list(range(2, 14)), 4)]
    with progress.stage("bench throughput: warming up (the first pass builds the native kernels)"):
        for each in llms.values():
            _run_marserve(each, warm)
        if hf is not None:
            _run_hf(hf, warm)
    results = {}
    probe = BandwidthProbe()
    bandwidths = [limits.bandwidth_gbs]
    for name in args.workloads.split(","):
        if name == "prefix":
            for dtype, each in llms.items():
                with progress.stage(f"bench throughput: prefix [{dtype}]"):
                    cold, warm = _prefix_ttft(each, each.config.vocab_size)
                print(f"  prefix [{dtype}]: TTFT with a new 400-token prefix {cold * 1e3:.1f} ms, same prefix again "
                      f"{warm * 1e3:.1f} ms: {cold / warm:.1f}x lower", flush=True)
                results[f"{name}/{dtype}"] = {"cold_ttft_s": cold, "warm_ttft_s": warm}
            continue
        ours = {d: [] for d in dtypes}
        beside = {d: [] for d in dtypes}
        theirs = []
        # One bar per workload over its timed runs (each repeat runs every dtype, then transformers); it is
        # closed before the workload's rows are printed.
        shown = progress.bar(total=args.repeats * (len(llms) + (hf is not None)), desc=f"bench {name}", unit="run")
        for repeat in range(args.repeats):
            work = _workload(name, llm.config.vocab_size, args.quick, repeat)  # new prompts: no prefix-cache hits
            for dtype, each in llms.items():
                shown.set_postfix_str(f"marserve {dtype}")
                before = probe.read_gbs()
                ours[dtype].append(_run_marserve(each, work))
                beside[dtype].append(max(before, probe.read_gbs()))
                shown.update()
            if hf is not None:
                shown.set_postfix_str("transformers")
                theirs.append(_run_hf(hf, work))
                shown.update()
        shown.close()
        for dtype in dtypes:
            bandwidths += beside[dtype]
        best_hf = max(theirs) if theirs else None
        for dtype in dtypes:
            best = max(ours[dtype])
            line = f"{name:>8} [{dtype}]: marserve {best:8.1f} tok/s"
            if best_hf:
                line += f" | transformers fp32 {best_hf:8.1f} tok/s | ratio {best / best_hf:5.2f}x"
            if dtype != dtypes[0]:
                line += f" | {best / max(ours[dtypes[0]]):.2f}x marserve {dtypes[0]}"
            result = {"marserve_tok_s": best, "transformers_tok_s": best_hf}
            if name == "batch1":
                nbytes = _decode_bytes(llms[dtype].model)
                share_now = max(o * nbytes / (bw * 1e9) for o, bw in zip(ours[dtype], beside[dtype]))
                top_bw = max(bandwidths)
                line += (f" | {nbytes / 1e6:.0f} MB/token; share of the roofline {share_now:.0%} against the "
                         f"bandwidth read beside the run, {best * nbytes / (top_bw * 1e9):.0%} against the best "
                         f"of the whole run ({top_bw:.1f} GB/s: {top_bw * 1e9 / nbytes:.0f} tok/s)")
                result.update(bytes_per_token=nbytes, share_beside=share_now, share_of_best_bandwidth=best * nbytes /
                              (top_bw * 1e9), bandwidth_beside_gbs=beside[dtype], best_bandwidth_gbs=top_bw)
            print(line + f" | ISA {limits.isa}", flush=True)
            results[f"{name}/{dtype}"] = result
    print("command: marserve bench throughput " + " ".join(shlex.quote(a) for a in sys.argv[3:]))
    print(json.dumps({"limits": limits.__dict__, "results": results}))
    return 0
