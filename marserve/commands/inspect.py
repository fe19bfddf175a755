"""`marserve inspect MODEL_DIR`: architecture, sizes, parameter counts and MAR settings of a checkpoint; --routing hands over to the routing analysis, --placement N to marserve.experts.placement_eval."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from marserve import progress
from marserve.config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, help="model directory (default: the bundled default model)")
    p.add_argument("--routing", action="store_true", help="analyse expert use per domain (marserve.analysis.routing)")
    p.add_argument("--placement", type=int, default=None, metavar="N",
                   help="expert placements over N ranks: local share and bytes per token on held-out text")
    p.add_argument("--placement-json", default=None, metavar="FILE",
                   help="write the placements and their figures (serve/generate take it as --expert-placement FILE)")
    add_routing_arguments(p)
    progress.add_quiet_flag(p)


def add_routing_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the routing analysis (marserve.analysis.routing), here so that the parser needs no torch."""
    g = p.add_argument_group("routing analysis (--routing)")
    g.add_argument("--prompts", default=None,
                   help="text file: one prompt per line, or JSON lines {\"domain\", \"text\"}; "
                        "default: the held-out slice of every corpus domain")
    g.add_argument("--routing-json", default=None, help="where to write the JSON report (default: stdout only)")
    g.add_argument("--routing-png", default=None, help="where to write the domain x expert heatmap PNG")
    g.add_argument("--routing-seq-len", type=int, default=256)
    g.add_argument("--routing-max-tokens", type=int, default=8192, help="tokens per domain analysed")
    g.add_argument("--routing-threads", type=int, default=1, help="torch threads for the analysis")


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters, computed from the config (no weights loaded)."""
    c = config
    H, V = c.hidden_size, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = H * q + 2 * H * kv + q * H
    if c.attention_bias:
        attn += q + 2 * kv
    if c.model_type == "qwen3_moe":
        attn += 2 * c.head_dim
    elif c.model_type == "olmoe":
        attn += q + kv
    embed = V * H * (1 if c.tie_word_embeddings else 2)
    total = active = embed + H  # + final norm
    expert = 3 * H * c.moe_intermediate_size
    for i in range(c.num_hidden_layers):
        layer = attn + 2 * H
        if c.is_moe_layer(i):
            shared = 3 * H * c.shared_expert_intermediate_size + H if c.shared_expert_intermediate_size else 0
            layer += H * c.num_experts + shared
            total += layer + c.num_experts * expert
            active += layer + c.num_experts_per_tok * expert
        else:
            layer += 3 * H * c.intermediate_size
            total += layer
            active += layer
    return total, active


def describe(config: ModelConfig) -> list[str]:
    c = config
    total, active = parameter_counts(c)
    moe_layers = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    lines = [
        f"architecture:   {c.model_type}",
        f"layers:         {c.num_hidden_layers} ({len(moe_layers)} MoE)",
        f"hidden:         {c.hidden_size} (heads {c.num_attention_heads}, kv heads {c.num_key_value_heads}, "
        f"head dim {c.head_dim})",
        f"experts:        E={c.num_experts} top-k={c.num_experts_per_tok} expert intermediate "
        f"{c.moe_intermediate_size} norm_topk_prob={c.norm_topk_prob}"
        + (f" shared expert {c.shared_expert_intermediate_size}" if c.shared_expert_intermediate_size else ""),
        f"vocab:          {c.vocab_size} (tied embeddings: {c.tie_word_embeddings})",
        f"parameters:     {total:,} total, {active:,} active per token",
        f"dtype:          {c.dtype}",
    ]
    if c.mar is None:
        lines.append("MAR:            none (plain MoE checkpoint)")
    else:
        layers = "all MoE layers" if c.mar.layers is None else f"layers {c.mar.layers}"
        lines.append(f"MAR:            version {c.mar.version}, {c.mar.memory_slots} memory slots per expert, "
                     f"affinity_scale {c.mar.affinity_scale}, {layers}")
    return lines


def run(args: argparse.Namespace) -> int:
    from marserve.commands.generate import resolve_model_dir
    from marserve.loader import checkpoint_files
    model_dir = resolve_model_dir(args.model_dir)
    config = ModelConfig.from_dir(model_dir)
    checkpoint_files(model_dir)  # a missing or corrupt weights file is reported here, not later
    sys.stdout.write("\n".join(describe(config)) + "\n")
    if args.routing:
        try:
            routing = importlib.import_module("marserve.analysis.routing")
        except ModuleNotFoundError:
            print("routing analysis not available", file=sys.stderr)
            return 1
        args.model_dir = str(model_dir)
        return int(routing.run(args) or 0)
    if args.placement is not None:
        from marserve.experts import placement_eval
        found = placement_eval.report(model_dir, args.placement, args.routing_seq_len, args.routing_max_tokens)
        placement_eval.print_report(found)
        if args.placement_json:
            with open(args.placement_json, "w") as f:
                json.dump(found, f, indent=1)
    return 0
