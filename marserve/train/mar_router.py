"""Puts Memory-Aware Routing into a transformers MoE model for training: memory/usage buffers, MAR router, memory update.

Shape legend: T=tokens, E=experts, K=active per token, H=hidden, S=memory slots per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marserve.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass
class MARSettings:
    """MAR's training knobs; affinity_scale=0 with enabled=False is the plain-routing twin."""

    enabled: bool = True
    memory_slots: int = 8
    affinity_scale: float = 1.0
    memory_decay: float = 0.99   # how slowly a slot forgets the tokens it took
    usage_decay: float = 0.99    # EMA of each expert's share of routed tokens

    def __post_init__(self):
        if self.memory_slots < 1:
            raise ConfigError(f"memory_slots must be >= 1, got {self.memory_slots}")
        for name in ("memory_decay", "usage_decay"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}")
        if self.affinity_scale < 0:
            raise ConfigError(f"affinity_scale must be >= 0, got {self.affinity_scale}")


class MARState(nn.Module):
    """The per-layer MAR buffers, saved as <block>.mar.memory [E,S,H] and <block>.mar.usage [E]."""

    def __init__(self, num_experts: int, memory_slots: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        # Slots start as random unit vectors (spec); no gradient ever reaches them.
        mem = torch.randn(num_experts, memory_slots, hidden, generator=generator)
        self.register_buffer("memory", F.normalize(mem, dim=-1))
        self.register_buffer("usage", torch.full((num_experts,), 1.0 / num_experts))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """a[t, e] = max_s <x_t/||x_t||, memory[e, s]>; x [T,H] -> [T,E]."""
        xn = F.normalize(x.float(), dim=-1)
        return torch.einsum("th,esh->tes", xn, self.memory.float()).amax(dim=-1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, topk_ids: torch.Tensor, memory_decay: float, usage_decay: float) -> None:
        """The spec's post-step update from one batch's router inputs x [T,H] and selections topk_ids [T,K]."""
        num_experts = self.memory.shape[0]
        xn = F.normalize(x.float(), dim=-1)
        onehot = F.one_hot(topk_ids, num_experts).sum(dim=1).float()           # [T,E]: 1 if routed to e
        counts = onehot.sum(dim=0)                                              # [E]
        sums = onehot.t() @ xn                                                  # [E,H]
        for e in torch.nonzero(counts > 0).flatten().tolist():
            m = F.normalize(sums[e], dim=-1)
            s = int(torch.argmax(self.memory[e].float() @ m))
            self.memory[e, s] = F.normalize(memory_decay * self.memory[e, s].float() + (1 - memory_decay) * m, dim=-1)
        load_fraction = counts / counts.sum().clamp_min(1)
        self.usage.mul_(usage_decay).add_((1 - usage_decay) * load_fraction)
        self.usage.div_(self.usage.sum())   # guards float drift: usage must sum to 1


class MARRouter(nn.Module):
    """Drop-in for the transformers top-k router: same `weight` parameter and return values, MAR logits inside.

    Weighting: softmax over all E of z, top-k, renormalised over the top-k when the architecture does so
    (always for mixtral, norm_topk_prob for the others); for qwen2_moe that is exactly its rule, for the others
    softmax-then-renormalise equals softmax over the top-k of z.
    """

    def __init__(self, base: nn.Module, state: MARState | None, affinity_scale: float, renormalise: bool):
        super().__init__()
        self.weight = base.weight
        self.top_k = base.top_k
        self.num_experts = base.num_experts
        self.hidden_dim = base.hidden_dim
        self.affinity_scale = affinity_scale
        self.renormalise = renormalise
        # Not a child module: the state is saved under the MoE block (<block>.mar.*), not under the gate.
        object.__setattr__(self, "_state", state)
        self.record = False
        self.last = None            # (x [T,H] detached, z [T,E], topk_ids [T,K]) of the last forward
        self.routing_observer = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z = W x + beta * a: MAR routing logits [T,E] for router inputs x [T,H]."""
        g = F.linear(x, self.weight)
        if self._state is None or self.affinity_scale == 0:
            return g
        return g + self.affinity_scale * self._state.affinity(x).to(g.dtype)

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)                  # [T,H]
        z = self.logits(x)                                              # [T,E]
        probs = torch.softmax(z.float(), dim=-1)
        top_w, top_ids = torch.topk(probs, self.top_k, dim=-1)          # [T,K]
        if self.renormalise:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if self.record:
            self.last = (x.detach(), z, top_ids)
        if self.routing_observer is not None:
            self.routing_observer(self.layer_idx, x.detach(), z, top_ids, top_w)
        return z, top_w.to(z.dtype), top_ids


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, MoE block) for every decoder layer whose block has a top-k router."""
    out = []
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "mlp", None)
        if block is None or not hasattr(block, "gate") or not hasattr(block, "experts"):
            continue
        out.append((i, block))
    return out


def install_mar(model: nn.Module, settings: MARSettings, seed: int = 0) -> list[MARRouter]:
    """Replaces every MoE block's gate by a MARRouter; adds block.mar (MARState) when MAR is enabled."""
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    renormalise = model_type == "mixtral" or bool(getattr(model.config, "norm_topk_prob", False))
    gen = torch.Generator().manual_seed(seed + 7919)
    routers = []
    for i, block in moe_blocks(model):
        state = None
        if settings.enabled:
            state = MARState(block.gate.num_experts, settings.memory_slots, block.gate.hidden_dim, gen)
            block.mar = state
        router = MARRouter(block.gate, state, settings.affinity_scale if settings.enabled else 0.0, renormalise)
        router.layer_idx = i
        block.gate = router
        routers.append(router)
    return routers


def load_balancing_loss(routers: list[MARRouter]) -> torch.Tensor:
    """Switch-style auxiliary loss E * sum_e f_e * P_e, averaged over layers (f = routed share, P = mean prob)."""
    losses = []
    for r in routers:
        _, z, ids = r.last
        probs = torch.softmax(z.float(), dim=-1)                        # [T,E]
        f = F.one_hot(ids, r.num_experts).sum(dim=1).float().mean(dim=0) / r.top_k
        losses.append(r.num_experts * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def update_memories(routers: list[MARRouter], settings: MARSettings) -> None:
    for r in routers:
        if r._state is not None:
            x, _, ids = r.last
            r._state.update(x, ids, settings.memory_decay, settings.usage_decay)
