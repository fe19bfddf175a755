"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, every layer sparse."""

from marserve.models.base import MoeForCausalLM


class OlmoeForCausalLM(MoeForCausalLM):
    qk_norm = "full"
    moe_name = "mlp"
