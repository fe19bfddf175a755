"""Qwen3-MoE: per-head q/k RMSNorm, no shared expert, sparse layers per decoder_sparse_step/mlp_only_layers."""

from marserve.models.base import MoeForCausalLM


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = "head"
    moe_name = "mlp"
