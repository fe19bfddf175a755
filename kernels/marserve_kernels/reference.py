"""Plain-torch references: the definitions every faster path is tested against (the MoE, the rotary embedding).

Legend: T=tokens, H=hidden, E=experts, I=expert intermediate size, K=experts per token, D=head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * (silu(x W_gate^T) * (x W_up^T)) W_down^T for expert ids[t,k].

    Written per (token, slot) with no in-place ops, so autograd flows through it (the trainer uses it).
    hidden [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_* [T, K] -> [T, H].
    """
    inter = w13.shape[1] // 2
    gate_up = torch.einsum("th,tkih->tki", hidden, w13[topk_ids])  # [T, K, 2I]
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]  # [T, K, I]
    down = torch.einsum("tki,tkhi->tkh", act, w2[topk_ids])  # [T, K, H]
    return (down * topk_weights.to(down.dtype).unsqueeze(-1)).sum(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding, the one every model here uses. x [T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
