"""`marserve generate`: offline text generation from one or more prompts with the LLM API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marserve import progress
from marserve.commands.expert_flags import add_expert_flags, expert_kwargs
from marserve.errors import CheckpointError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model directory (default: the bundled default model)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=None, help="default: generation_config.json, else 16")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: generation_config.json")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--echo", action="store_true",
                   help="print each prompt before its output (on its own line with --chat)")
    add_expert_flags(p)
    progress.add_quiet_flag(p)


def resolve_model_dir(model_dir: str | None) -> Path:
    """The named directory, or marserve.DEFAULT_MODEL_DIR with a clear error if it is not there."""
    if model_dir is not None:
        return Path(model_dir)
    from marserve import DEFAULT_MODEL_DIR
    if not (Path(DEFAULT_MODEL_DIR) / "config.json").is_file():
        raise CheckpointError(f"no model directory given and the default model ({DEFAULT_MODEL_DIR}) is not "
                              "installed; pass MODEL_DIR")
    return Path(DEFAULT_MODEL_DIR)


def run(args: argparse.Namespace) -> int:
    from marserve.llm import LLM
    from marserve.sampling_params import SamplingParams
    llm = LLM(resolve_model_dir(args.model_dir), dtype=args.dtype, **expert_kwargs(args))
    defaults = llm.default_sampling_params()
    params = SamplingParams(
        max_tokens=args.max_tokens if args.max_tokens is not None else defaults.max_tokens,
        temperature=args.temperature if args.temperature is not None else defaults.temperature,
        top_p=defaults.top_p if args.temperature != 0 else 1.0, top_k=defaults.top_k, seed=args.seed)
    prompts = args.prompt
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
    # A text-continuation output reads on from its prompt; a chat answer starts its own line.
    echo_sep = "\n" if args.chat else ""
    for given, out in zip(args.prompt, llm.generate(prompts, params)):
        sys.stdout.write((given + echo_sep if args.echo else "") + out.outputs[0].text + "\n")
    return 0
