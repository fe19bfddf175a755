"""Qwen2-MoE: q/k/v biases, sparse layers per decoder_sparse_step/mlp_only_layers, sigmoid-gated shared expert."""

from marserve.models.base import MoeForCausalLM


class Qwen2MoeForCausalLM(MoeForCausalLM):
    qk_norm = None
    moe_name = "mlp"
