"""`marserve bench {throughput,moe}`: dispatches to the benchmark modules in marserve/bench/."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "throughput": ("marserve.bench.throughput", "offline generation throughput, marserve vs transformers"),
    "moe": ("marserve.bench.moe", "one MoE layer at several token counts vs transformers and a naive loop"),
    "linear": ("marserve.bench.linear", "CPU linear layers on cold weights: MKL vs oneDNN, 4K vs huge pages"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_bench_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_bench_missing=True)


def run(args) -> int:
    if getattr(args, "_bench_missing", False):
        print(f"marserve: benchmark '{args.benchmark}' is not available in this build")
        return 2
    return importlib.import_module(args._bench_module).run(args)
