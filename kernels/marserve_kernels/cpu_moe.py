"""The CPU MoE path: tokens grouped by expert, one gate/up and one down matmul per active expert.

Each active expert's weights are read once per call (what bounds decode speed), and no dense
[E, ...] intermediate is materialised. Legend: T=tokens, H=hidden, E=experts, I=expert
intermediate size, K=experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, K] -> [T, H]."""
    T, K = topk_ids.shape
    inter = w13.shape[1] // 2
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    token_of = order // K  # source token of each sorted pair
    x_sorted = hidden.index_select(0, token_of)  # [T*K, H]
    w_sorted = topk_weights.reshape(-1).index_select(0, order).to(hidden.dtype)  # [T*K]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate_up = F.linear(x_sorted[rows], w13[e])  # [n, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        y_sorted[rows] = F.linear(act, w2[e]) * w_sorted[rows, None]  # [n, H]
        start += n
    out = torch.zeros_like(hidden)
    out.index_add_(0, token_of, y_sorted)  # sum the K expert outputs of each token
    return out
