"""What the prefetcher costs a decode step: its routing observer and before_step, timed on a served model.

The model is loaded and packed as the engine serves it (LLM), providers left resident (their prefetch() does
nothing), so what is timed is prediction alone: for batch sizes B, one decode step's worth of calls (before_step on
B one-token sequences, then on_routing on every MoE layer with a [B,H] router input), best of --repeats rounds of
--steps steps. Reported next to the model's own decode step time at batch 1 on the same path (per-layer decode, the
path an offloading store takes), measured by generating --tokens tokens.
Run: `python -m marserve.bench.prefetch_overhead [MODEL_DIR]`. Legend: B=sequences in the batch, H=hidden.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch


def time_observer(prefetcher, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """Best (wall, this thread's CPU) seconds per decode step of the prefetcher's own work at this batch size.

    The CPU time is what the calls cost when the machine is shared: wall time also counts waiting for a core."""
    blocks = prefetcher.blocks
    dtype = next(prefetcher.model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, blocks[0].experts.hidden_size, generator=g).to(dtype) for _ in blocks]
    seqs = [[int(t)] for t in torch.randint(0, prefetcher.model.config.vocab_size, (batch,), generator=g)]
    decode = [False] * batch
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            prefetcher.before_step(seqs, decode)
            for b, x in zip(blocks, xs):
                prefetcher.on_routing(b.layer_idx, x)
        wall = min(wall, (time.perf_counter() - start) / steps)
        cpu = min(cpu, (time.thread_time() - start_cpu) / steps)
    return wall, cpu


def decode_step_seconds(llm, tokens: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per generated token at batch 1, greedy, on the per-layer decode path."""
    from marserve.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(["The river"], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up: kernels built
    start, start_cpu = time.perf_counter(), time.process_time()
    llm.generate(["The river"], params)
    return (time.perf_counter() - start) / tokens, (time.process_time() - start_cpu) / tokens


def main(argv: list[str] | None = None) -> int:
    from marserve.default_model import MODEL_DIR
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", default=MODEL_DIR)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from marserve.experts.prefetcher import Prefetcher
    from marserve.experts.preferences import load_preferences
    from marserve.llm import LLM
    from marserve_kernels import cpu_features
    llm = LLM(a.model_dir)
    prefs = load_preferences(a.model_dir, llm.model)
    print(f"command: python -m marserve.bench.prefetch_overhead {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {cpu_features.describe()}, {a.threads} torch thread(s)")
    print(f"model: {a.model_dir} ({len(llm.model.moe_blocks())} MoE layers), dtype {next(llm.model.parameters()).dtype}")
    print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    print("| predictor | lookahead | batch | us/step (wall) | us/step (CPU) | CPU us/layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    kinds = ["router"] + (["learned"] if prefs is not None and prefs.has_predictors else [])
    for kind in kinds:
        for lookahead in (1, 2):
            pf = Prefetcher(llm.model, prefs, lookahead=lookahead, predictor=kind)
            for b in a.batch:
                wall, cpu = time_observer(pf, b, a.steps, a.repeats)
                print(f"| {kind} | {lookahead} | {b} | {wall * 1e6:.0f} | {cpu * 1e6:.0f} | "
                      f"{cpu * 1e6 / len(pf.blocks):.0f} |")
    pf = Prefetcher(llm.model, prefs).install()  # the defaults, as the engine builds it
    step = decode_step_seconds(llm, a.tokens)
    pf.uninstall()
    for b in llm.model.moe_blocks():  # the same per-layer path without prediction: an observer that does nothing
        b.routing_observer = lambda *args: None
    bare = decode_step_seconds(llm, a.tokens)
    print(f"batch-1 decode, per-layer path, ms/token (wall / CPU): {bare[0] * 1e3:.2f} / {bare[1] * 1e3:.2f} without "
          f"prediction, {step[0] * 1e3:.2f} / {step[1] * 1e3:.2f} with the default Prefetcher "
          f"({pf.predictor.name}, lookahead {pf.predictor.lookahead})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
