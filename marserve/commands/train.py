"""`marserve train`: builds the local corpus and tokenizer if needed, then trains a small MoE with or without MAR."""

from __future__ import annotations

import argparse
import json
import os

from marserve import progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="checkpoint directory (resumes from it if it holds trainer_state.pt)")
    p.add_argument("--corpus", default="/tmp/marserve-corpus",
                   help="corpus directory; built with marserve.data.corpus if it has no *.train.txt")
    p.add_argument("--tokenizer", default=None,
                   help="directory with tokenizer.json; default: <corpus>/tokenizer, trained on the corpus if missing")
    p.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-intermediate", type=int, default=256)
    p.add_argument("--no-mar", action="store_true", help="plain routing: the twin to compare MAR with")
    p.add_argument("--memory-slots", type=int, default=8)
    p.add_argument("--affinity-scale", type=float, default=1.0)
    p.add_argument("--memory-decay", type=float, default=0.99)
    p.add_argument("--usage-decay", type=float, default=0.99)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")
    progress.add_quiet_flag(p)


def ensure_corpus_and_tokenizer(corpus: str, tokenizer_dir: str, vocab_size: int, seq_len: int) -> None:
    import glob

    from marserve.data.corpus import build
    from marserve.train.tokenizer import save_tokenizer, train_tokenizer
    if not glob.glob(os.path.join(corpus, "*.train.txt")):
        print(f"building corpus in {corpus} ...", flush=True)
        build(corpus)
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        print(f"training tokenizer ({vocab_size} tokens) into {tokenizer_dir} ...", flush=True)
        tok = train_tokenizer(sorted(glob.glob(os.path.join(corpus, "*.train.txt"))), vocab_size)
        save_tokenizer(tok, tokenizer_dir, model_max_length=1024)


def run(args: argparse.Namespace) -> int:
    from marserve.train.mar_router import MARSettings
    from marserve.train.trainer import ModelShape, TrainConfig, train
    tokenizer_dir = args.tokenizer or os.path.join(args.corpus, "tokenizer")
    ensure_corpus_and_tokenizer(args.corpus, tokenizer_dir, args.vocab_size, args.seq_len)
    cfg = TrainConfig(
        corpus_dir=args.corpus, out_dir=args.out, tokenizer_dir=tokenizer_dir,
        shape=ModelShape(model_type=args.arch, vocab_size=args.vocab_size, hidden_size=args.hidden,
                         num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                         num_experts=args.experts, top_k=args.top_k, expert_intermediate=args.expert_intermediate),
        mar=MARSettings(enabled=not args.no_mar, memory_slots=args.memory_slots, affinity_scale=args.affinity_scale,
                        memory_decay=args.memory_decay, usage_decay=args.usage_decay),
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        aux_loss_coef=args.aux_loss_coef, seed=args.seed, save_every=args.save_every, threads=args.threads,
        save_dtype=args.save_dtype, progress=not (args.no_progress or args.quiet))
    summary = train(cfg)
    print(json.dumps(summary))
    return 0
