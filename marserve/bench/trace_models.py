"""Trains the small trace models of the expert-offloading replay: per served model (Mixtral-8x7B, Qwen3-30B-A3B,
DeepSeek-V2-Lite) an MoE with its expert count, top-k and MoE layer count, and a tiny hidden size.

    python -m marserve.bench.trace_models --served qwen3-30b-a3b --out DIR [--no-mar] [--steps N]

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


def main(argv: list[str] | None = None) -> int:
    from marserve.commands.train import ensure_corpus_and_tokenizer
    from marserve.default_model import MODEL_DIR
    from marserve.train.mar_router import MARSettings
    from marserve.train.trainer import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--served", required=True, choices=sorted(SERVED_MODELS))
    p.add_argument("--out", required=True)
    p.add_argument("--no-mar", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--corpus", default="/tmp/marserve-corpus")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    s = SERVED_MODELS[args.served]
    # the shipped model's tokenizer: every trace model reads the same token ids
    ensure_corpus_and_tokenizer(args.corpus, MODEL_DIR, 4096, args.seq_len)
    shape = GroupedShape(model_type=s.proxy_arch, hidden_size=args.hidden, num_layers=s.num_moe_layers,
                         num_heads=4, num_kv_heads=2, num_experts=s.num_experts, top_k=s.top_k,
                         expert_intermediate=args.hidden)
    cfg = TrainConfig(corpus_dir=args.corpus, out_dir=args.out, tokenizer_dir=MODEL_DIR, shape=shape,
                      mar=MARSettings(enabled=not args.no_mar), steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, save_every=50, threads=args.threads, progress=False, stability_every=0)
    print(json.dumps(train(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
