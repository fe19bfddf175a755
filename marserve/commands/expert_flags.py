"""The expert-offloading flags shared by `generate`, `serve` and `bench` (one spelling everywhere; docs/offload.md)."""

from __future__ import annotations

import argparse

from marserve.experts.policies import POLICIES


def add_expert_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading (docs/offload.md)")
    g.add_argument("--expert-cache", type=float, default=1.0,
                   help="share of all expert bytes kept in memory, (0, 1]; the rest is read from the checkpoint "
                        "files when used (default 1: every expert resident)")
    g.add_argument("--expert-cache-gb", type=float, default=None,
                   help="the expert budget as a size in GB instead of a share")
    g.add_argument("--expert-policy", default="lru", choices=POLICIES,
                   help="which resident expert makes room: lru, lfu, or mar (usage prior + live predictions)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="read predicted experts ahead of use when offloading (default on)")


def expert_kwargs(args: argparse.Namespace) -> dict:
    """The LLM / EngineConfig keywords of those flags."""
    return dict(expert_cache=args.expert_cache, expert_cache_gb=args.expert_cache_gb,
                expert_policy=args.expert_policy, prefetch=args.prefetch)
