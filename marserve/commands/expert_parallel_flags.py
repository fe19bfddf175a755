"""The expert-parallel flags shared by generate, serve and bench (no torch import: the parser stays fast)."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert parallelism (launch every rank with torchrun; docs/expert_parallel.md)")
    g.add_argument("--expert-parallel-size", type=int, default=1, metavar="N",
                   help="split every MoE layer's experts over N ranks (torchrun's WORLD_SIZE)")
    g.add_argument("--expert-placement", default="mar", metavar="mar|round_robin|FILE",
                   help="which rank holds which expert: mar (from MAR memory; round_robin without MAR), "
                        "round_robin, or FILE from marserve inspect --placement N --placement-json FILE")
    g.add_argument("--expert-parallel-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a rank silent this long ends the engine with an error")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {"expert_parallel_size": args.expert_parallel_size, "expert_placement": args.expert_placement,
            "expert_parallel_timeout": args.expert_parallel_timeout}


def is_follower(args: argparse.Namespace) -> bool:
    """A rank other than 0 of an expert-parallel launch: it serves no port and prints nothing."""
    return args.expert_parallel_size > 1 and os.environ.get("RANK", "0") != "0"
