"""marserve_kernels: MoE compute paths behind one signature.

(hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, K], topk_ids [T, K]) -> [T, H]
- moe_reference: plain torch, differentiable (the definition).
- moe: the path the MoE layer calls; picks the fastest available for the tensors.
"""

from __future__ import annotations

import torch

from marserve_kernels.cpu_moe import grouped_moe
from marserve_kernels.reference import moe_reference

__all__ = ["moe", "moe_reference", "grouped_moe"]


def moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, w13, w2, topk_weights)):
        # Training: the grouped path writes into buffers in place; the reference is differentiable.
        return moe_reference(hidden, w13, w2, topk_weights, topk_ids)
    return grouped_moe(hidden, w13, w2, topk_weights, topk_ids)
