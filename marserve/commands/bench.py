"""`marserve bench {throughput,moe,linear,serve,ep,experts,reads}`: each benchmark's flags, and the dispatch to its module in marserve/bench/.

The flags live here, not in the benchmark modules, because those import torch at the top and building the
parser must not: `marserve --help` and usage errors answer without loading torch (~4 s).
"""

from __future__ import annotations

import argparse
import importlib
import os

from marserve import progress
from marserve.commands.expert_flags import add_expert_flags


def _throughput_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bench", help="'bench' (a random Mixtral-style model made here), "
                   "'default' (the shipped model) or a model directory")
    p.add_argument("--workloads", default="batch1,16x128,mixed64,prefix", help="comma-separated")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32", help="comma-separated marserve weight dtypes, each run "
                   "side by side with the others (e.g. float32,bfloat16); transformers always runs fp32")
    p.add_argument("--quick", action="store_true", help="shorter outputs and fewer prompts (smoke run)")
    p.add_argument("--skip-hf", action="store_true", help="marserve only")
    add_expert_flags(p)


def _moe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="bench,default",
                   help="comma-separated: 'bench' (H1024 I2816 E32 top-2), 'default' (the shipped model's "
                   "MoE shape) or HxIxExK")
    p.add_argument("--tokens", default="1,8,32,256,2048", help="comma-separated token counts T")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the best is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 repeats, small limit measurements (figures are then rough)")
    p.add_argument("--skip-naive", action="store_true", help="skip the naive loop")
    p.add_argument("--no-packed", action="store_true",
                   help="skip the T >= 256 rows re-timed with pack_experts() (opt-in blocked expert copies)")


def _linear_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="1,16,256", help="comma-separated token counts")
    p.add_argument("--layers", type=int, default=24, help="layers' worth of weights cycled through")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: torch's thread count (the cores)")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the OpenAI-compatible server")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                   help="/v1/completions or /v1/chat/completions (streamed either way)")
    p.add_argument("--model", default=None, help="model name to send (default: the first at /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("MARSERVE_API_KEY"), help="bearer token "
                   "(default: $MARSERVE_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per point of the sweep")
    p.add_argument("--request-rate", default="inf", help="requests/s, comma-separated to sweep (e.g. 1,4,16); "
                   "'inf' sends them all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier, > 1 steadier")
    p.add_argument("--max-concurrency", default=None,
                   help="requests in flight at most, comma-separated to sweep (e.g. 1,4,16,64); default: no limit")
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in tokens")
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    p.add_argument("--dataset", default=None,
                   help='JSONL of {"prompt": ..., "output_len": ...} per line instead of synthetic prompts')
    p.add_argument("--tokenizer", default=None, help="model directory or tokenizer.json to size prompts "
                   "exactly ('default': the shipped model's); without it a word counts as a token")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly --output-len tokens (vLLM's ignore_eos/min_tokens extras)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLO for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--output", default="bench_serve.json", help="JSON results; plots are written beside it")


def _ep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (the shipped model) or a model directory")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts measured on this host")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--replay-ranks", type=int, default=8, help="GPUs of the trace-replay model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights of the measured runs (bf16 partial sums round per rank: outputs may drift)")
    p.add_argument("--skip-measure", action="store_true", help="the trace replay only")


def _experts_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="default,twin,bench", help="live runs, comma-separated: 'default', 'twin' "
                   "(needs --twin), 'bench' (the Mixtral-style ~1.4 GB model of `bench throughput`) or directories")
    p.add_argument("--twin", default=None, help="the default model's --no-mar twin (not shipped; made with "
                   "`marserve train --out DIR --steps 1300 --threads 1 --no-mar --tokenizer marserve/default_model`)")
    p.add_argument("--budgets", default="1,0.5,0.25,0.125", help="expert cache shares (below the minimum: raised)")
    p.add_argument("--policies", default="lru,lfu,mar")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt (live)")
    p.add_argument("--prompts", type=int, default=4, help="fixed prompts, run one after another (batch 1)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="live: 0 = greedy; above, sampled text with a fixed seed per prompt (the same in every run)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (the store's reads run beside them)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--drop-caches", default="global", choices=["global", "files"],
                   help="before each live run: 'global' = drop_caches when root (else as 'files'), 'files' = "
                   "posix_fadvise(DONTNEED) on the model's files only")
    p.add_argument("--replay", default="", help="trace models for the replay, NAME=DIR,... with NAME in "
                   "mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite (made by python -m marserve.bench.trace_models)")
    p.add_argument("--trace-tokens", type=int, default=2048, help="tokens of held-out text recorded per trace")
    p.add_argument("--trace-part", type=int, default=0, help="replay: which slice of the held-out text to record "
                   "(0: the first; k: the k-th after it, other text: a second trace to check what was tuned on part 0)")
    p.add_argument("--lookahead", type=int, default=2, help="replay: MoE layers ahead a prefetch predicts")
    p.add_argument("--tiers", default="host,disk", help="replay: where missing experts come from (PCIe / NVMe)")
    p.add_argument("--prefetch-min-prob", type=float, default=None,
                   help="replay: the Prefetcher's probability threshold (default: the Prefetcher's own)")
    p.add_argument("--live-prefetch-lookahead", type=int, default=None,
                   help="live: MoE layers ahead the prefetcher predicts (default: the engine's, 1)")
    p.add_argument("--live-prefetch-min-prob", type=float, default=None,
                   help="live: a fixed probability threshold at every distance instead of the adaptive one")
    p.add_argument("--work-dir", default="/tmp/marserve-bench-experts", help="cache of recorded traces")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--skip-replay", action="store_true")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 prompt x 8 tokens, traces of 256 tokens")


def _reads_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (the shipped model), 'bench' (the Mixtral-style "
                   "model of `bench throughput`) or a model directory")
    p.add_argument("--experts", type=int, default=None, help="random experts read per run, the same sequence for "
                   "every run (default: enough for ~384 MB, at least 48)")
    p.add_argument("--threads", default="1,2,4", help="reader thread counts, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the best of each figure is reported")
    p.add_argument("--dtype", default="auto", help="the slots' dtype, as the store's (auto, float32, bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="of the random expert sequence")
    p.add_argument("--quick", action="store_true", help="smoke run: small machine-limit measurements")
    p.add_argument("--json", default=None, help="write the report here")


# name -> (module with run(args) -> int, one-line help, flags)
BENCHMARKS = {
    "throughput": ("marserve.bench.throughput", "offline generation throughput, marserve vs transformers",
                   _throughput_flags),
    "moe": ("marserve.bench.moe", "one MoE layer at several token counts vs transformers and a naive loop",
            _moe_flags),
    "linear": ("marserve.bench.linear", "CPU linear layers on cold weights: MKL vs oneDNN, 4K vs huge pages",
               _linear_flags),
    "serve": ("marserve.bench.serve", "load an OpenAI-compatible server over HTTP: TTFT, TPOT, ITL, throughput, "
              "goodput", _serve_flags),
    "ep": ("marserve.bench.ep", "expert parallelism: tokens/s and bytes at 1/2/4 ranks; 8-GPU trace replay",
           _ep_flags),
    "experts": ("marserve.bench.experts", "expert offloading: live budgets/policies/prefetch, and a GPU trace replay",
                _experts_flags),
    "reads": ("marserve.bench.expert_reads", "the expert store's slow-tier reads: O_DIRECT vs page cache, alone "
              "and beside a decode stand-in", _reads_flags),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (_, help_text, flags) in BENCHMARKS.items():
        leaf = sub.add_parser(name, help=help_text, description=help_text)
        flags(leaf)
        progress.add_quiet_flag(leaf)


def run(args: argparse.Namespace) -> int:
    module = BENCHMARKS[args.benchmark][0]
    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"marserve: benchmark '{args.benchmark}' is not available in this build")
        return 2
    return bench.run(args)
