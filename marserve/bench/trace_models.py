"""Trains the small trace models of the expert-offloading replay: per served model (Mixtral-8x7B, Qwen3-30B-A3B,
DeepSeek-V2-Lite) an MoE with its expert count, top-k and MoE layer count, and a tiny hidden size.

    python -m marserve.bench.trace_models --served qwen3-30b-a3b --out DIR [--no-mar] [--steps N]
    python -m marserve.bench.trace_models --shape bench --out DIR [--steps N]

`--shape bench` trains instead a model of `marserve bench throughput`'s bench model's shape (BENCH_MODEL: H 512,
I 1536, 8 layers, 16 experts, top-2, 8 / 4 heads) with the shipped tokenizer's 4096-token vocabulary (tied
embeddings, so ~1.25 GB in fp32 against the random bench model's 1.36 GB), saved in fp32 like that model: a
*trained* MAR model on which the live expert-offloading targets can be measured.

It runs `marserve train`'s trainer with one change the command line cannot make: transformers' grouped-GEMM
expert implementation (`experts_implementation="grouped_mm"`) instead of its per-expert loop, which with 128
experts x 48 layers took ~6x longer per step on one CPU thread (24 s against 4.7 s for 4 x 128 tokens). The
arithmetic is the same; the checkpoint is an ordinary one.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from marserve.bench.expert_replay import SERVED_MODELS
from marserve.train.trainer import ModelShape


@dataclass
class GroupedShape(ModelShape):
    """A ModelShape whose transformers model runs its experts with grouped GEMMs."""

    def hf_config(self, eos_id: int, pad_id: int):
        config = super().hf_config(eos_id, pad_id)
        config._experts_implementation = "grouped_mm"
        return config


def bench_shape() -> GroupedShape:
    """The bench model's shape (marserve/bench/throughput.py BENCH_MODEL), vocabulary aside (the trainer's 4096)."""
    from marserve.bench.throughput import BENCH_MODEL as b
    return GroupedShape(model_type="mixtral", hidden_size=b["hidden_size"], num_layers=b["num_hidden_layers"],
                        num_heads=b["num_attention_heads"], num_kv_heads=b["num_key_value_heads"],
                        num_experts=b["num_local_experts"], top_k=b["num_experts_per_tok"],
                        expert_intermediate=b["intermediate_size"])


def served_shape(served: str, hidden: int) -> GroupedShape:
    """A trace model: the served model's expert count, top-k and MoE layer count at a tiny hidden size."""
    s = SERVED_MODELS[served]
    return GroupedShape(model_type=s.proxy_arch, hidden_size=hidden, num_layers=s.num_moe_layers, num_heads=4,
                        num_kv_heads=2, num_experts=s.num_experts, top_k=s.top_k, expert_intermediate=hidden)


def main(argv: list[str] | None = None) -> int:
    from marserve.commands.train import ensure_corpus_and_tokenizer
    from marserve.default_model import MODEL_DIR
    from marserve.train.mar_router import MARSettings
    from marserve.train.trainer import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--served", choices=sorted(SERVED_MODELS))
    which.add_argument("--shape", choices=["bench"], help="the bench model's shape instead of a trace model's")
    p.add_argument("--out", required=True)
    p.add_argument("--no-mar", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--corpus", default="/tmp/marserve-corpus")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps (fewer for short runs)")
    p.add_argument("--progress", action="store_true", help="a progress bar with loss and tokens/s")
    args = p.parse_args(argv)
    # the shipped model's tokenizer: every trace model reads the same token ids
    ensure_corpus_and_tokenizer(args.corpus, MODEL_DIR, 4096, args.seq_len)
    shape = bench_shape() if args.shape else served_shape(args.served, args.hidden)
    cfg = TrainConfig(corpus_dir=args.corpus, out_dir=args.out, tokenizer_dir=MODEL_DIR, shape=shape,
                      mar=MARSettings(enabled=not args.no_mar), steps=args.steps, warmup=args.warmup,
                      batch_size=args.batch_size,
                      seq_len=args.seq_len, save_every=args.save_every, threads=args.threads,
                      progress=args.progress, stability_every=0,
                      # the bench model is fp32; the trace models keep the trainer's bf16
                      save_dtype="float32" if args.shape else "bfloat16")
    print(json.dumps(train(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
