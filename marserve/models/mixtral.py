"""Mixtral: GQA attention, every layer a sparse MoE block named block_sparse_moe, top-k always renormalised."""

from marserve.models.base import MoeForCausalLM


class MixtralForCausalLM(MoeForCausalLM):
    qk_norm = None
    moe_name = "block_sparse_moe"
