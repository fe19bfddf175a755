"""`marserve calibrate MODEL_DIR`: records routing on sample text and writes the expert preferences (mar_preferences.safetensors).

Usage, prototypes and the learned lookahead predictors that placement and prefetching read (marserve/experts/
calibrate.py does the work). Works on plain and MAR checkpoints (a MAR checkpoint keeps its own usage and memory
for placement; the file adds the predictors). Weights and routing are never changed. `--eval` then measures the
predictors on the held-out text (marserve/bench/prediction.py) and prints the tables docs/offload.md quotes.
"""

from __future__ import annotations

import argparse
import os

from marserve import progress
from marserve.errors import ConfigError, MarserveError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="checkpoint directory (plain or MAR)")
    p.add_argument("--prompts", default=None,
                   help="text file: one prompt per line, or JSON lines {\"domain\", \"text\"}; default: the bundled "
                        "training corpus (built in --corpus first if missing, ~100 s)")
    p.add_argument("--corpus", default="/tmp/marserve-corpus", help="where the bundled corpus is (or is built)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of sample text to run (default 16384)")
    p.add_argument("--out", default=None, help="where to write (default MODEL_DIR/mar_preferences.safetensors)")
    p.add_argument("--lookahead", type=int, default=3, help="fit predictors up to this many MoE layers ahead")
    p.add_argument("--slots", type=int, default=None,
                   help="prototypes per expert (default: the checkpoint's mar.memory_slots, else 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window of sample text")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--eval", action="store_true",
                   help="then measure the predictors on the held-out text and print precision/recall tables")
    p.add_argument("--eval-only", action="store_true",
                   help="measure the preferences the model directory has now; calibrate nothing, write nothing")
    p.add_argument("--eval-tokens", type=int, default=10240, help="held-out tokens for --eval (default 10240)")
    progress.add_quiet_flag(p)


def _check(args) -> str:
    """Fail fast, in one line, before loading anything: the directory, the model type, the output's place."""
    from marserve.config import ModelConfig
    from marserve.experts.preferences import FILE_NAME
    d = args.model_dir
    if not os.path.isdir(d):
        raise ConfigError(f"{d}: no such directory")
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise ConfigError(f"{d}: not a model directory (no config.json)")
    try:
        ModelConfig.from_dir(d)
    except MarserveError as e:
        raise ConfigError(f"{d}: not an MoE checkpoint marserve can calibrate ({e})") from None
    for name, value in (("--tokens", args.tokens), ("--lookahead", args.lookahead), ("--seq-len", args.seq_len),
                        ("--eval-tokens", args.eval_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if args.slots is not None and args.slots < 1:
        raise ConfigError(f"--slots must be at least 1, got {args.slots}")
    out = args.out or os.path.join(d, FILE_NAME)
    parent = os.path.dirname(os.path.abspath(out))
    if not args.eval_only and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        raise ConfigError(f"{out}: cannot write there (directory missing or not writable); pass --out FILE")
    return out


def run(args: argparse.Namespace) -> int:
    out = _check(args)
    import torch
    from tokenizers import Tokenizer

    from marserve.analysis.routing import load_prompts
    from marserve.bench.prediction import run_eval
    from marserve.experts import calibrate as cal
    from marserve.experts.preferences import combine, load_preferences
    from marserve.loader import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    with progress.stage(f"loading {os.path.basename(os.path.normpath(args.model_dir))}"):
        model, config = load_model(args.model_dir)
    if not model.moe_blocks():
        raise ConfigError(f"{args.model_dir}: every layer is dense (mlp_only_layers): no experts to calibrate")
    if args.eval_only:
        prefs = load_preferences(args.model_dir, model)
    else:
        tok = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
        texts = load_prompts(args.prompts) if args.prompts else cal.corpus_texts(args.corpus)
        windows = cal.token_windows(tok, texts, args.tokens, args.seq_len)
        if not windows:
            raise ConfigError(f"{args.prompts or args.corpus}: no text to calibrate on")
        trace = cal.record_trace(model, windows)
        prefs = cal.calibrate(model, trace, args.lookahead, args.slots)
        try:
            prefs.save(out)
        except OSError as e:
            raise ConfigError(f"{out}: cannot write ({e.strerror or e})") from None
        print(f"wrote {out}: {len(prefs.layers)} MoE layers, {len(trace.tokens)} tokens, "
              f"predictors up to {args.lookahead} layers ahead")
        prefs = combine(model, prefs)  # what load_preferences gives once the file is in the model directory
    if args.eval or args.eval_only:
        run_eval(model, args.model_dir, prefs, args.lookahead, args.eval_tokens)
    return 0
