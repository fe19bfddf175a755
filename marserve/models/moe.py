"""The sparse MoE block shared by every architecture: router (with optional MAR memory affinity) + experts via an ExpertProvider.

Legend: T=tokens, E=experts, K=active experts per token, H=hidden, I=expert intermediate, S=MAR memory slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marserve.config import ModelConfig
from marserve.experts.provider import ExpertProvider, ResidentExperts
from marserve.models.layers import DenseMLP, Linear


def mar_affinity(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """a[t, e] = max_s <x_t / ||x_t||, memory[e, s]>: x [T,H], memory [E,S,H] -> [T,E] float32."""
    xn = F.normalize(x.float(), dim=-1)
    return torch.einsum("th,esh->tes", xn, memory.float()).amax(dim=-1)


def route(z: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all E, keep the top-k, renormalise over them if asked -> (weights [T,K] f32, ids [T,K]).

    Computed from the top-k logits alone (2-3 small ops instead of 4, which counts at decode): the
    softmax is monotone, so its top-k are the logits' top-k; renormalised, the weights are a softmax over
    those k logits; otherwise exp(z_k - logsumexp(z)). One rule for all four architectures.
    """
    z = z.float()
    top_z, ids = torch.topk(z, top_k, dim=-1)
    if renormalise:
        return torch.softmax(top_z, dim=-1), ids
    return torch.exp(top_z - torch.logsumexp(z, dim=-1, keepdim=True)), ids


class SparseMoeBlock(nn.Module):
    """gate -> (MAR) routing -> experts from the provider; plus qwen2_moe's sigmoid-gated shared expert."""

    def __init__(self, config: ModelConfig, layer_idx: int, experts: ExpertProvider | None = None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.top_k = c.num_experts_per_tok
        self.renormalise = c.norm_topk_prob
        self.gate = Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = experts if experts is not None else ResidentExperts(
            layer_idx, c.num_experts, c.hidden_size, c.moe_intermediate_size)
        self.has_mar = c.has_mar(layer_idx)
        self.affinity_scale = c.mar.affinity_scale if self.has_mar else 0.0
        if self.has_mar:
            self.register_buffer("mar_memory", torch.empty(c.num_experts, c.mar.memory_slots, c.hidden_size))
            self.register_buffer("mar_usage", torch.empty(c.num_experts))
        if c.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(c.hidden_size, c.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(c.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        # Called as observer(layer_idx, router_input, router_logits, topk_ids, topk_weights) when set.
        self.routing_observer = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """z [T,E]: gate logits, plus beta * memory affinity on MAR layers (differentiable through the gate)."""
        g = self.gate(x)
        if not self.has_mar:
            return g
        return g.float() + self.affinity_scale * mar_affinity(x, self.mar_memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T,H] (post-attention-norm hidden) -> [T,H]."""
        z = self.router_logits(x)  # [T,E]
        weights, ids = route(z, self.top_k, self.renormalise)  # [T,K] each
        return self.forward_routed(x, z, weights, ids)

    def forward_routed(self, x: torch.Tensor, z: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor) -> torch.Tensor:
        """The block once routed (the CPU decode kernel routes inside its own call): z [T,E] router logits,
        weights/ids [T,K] -> [T,H]."""
        if self.routing_observer is not None:
            self.routing_observer(self.layer_idx, x, z, ids, weights)
        out = self.experts.compute(x, weights.to(x.dtype), ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
