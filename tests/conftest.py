"""Shared fixtures: a session-wide cache of baby checkpoints built once per distinct set of arguments."""

from __future__ import annotations

import pytest

from tests.baby_models import make_baby_checkpoint


@pytest.fixture(scope="session")
def baby_checkpoint(tmp_path_factory):
    """Factory: baby_checkpoint(model_type, **kw) -> Path of a (cached) baby checkpoint directory."""
    cache = {}

    def build(model_type: str, **kw):
        key = (model_type, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"baby-{model_type}")
            cache[key] = make_baby_checkpoint(path, model_type, **kw)
        return cache[key]

    return build


def _grouped_moe_reference(hidden, w13, w2, topk_weights, topk_ids):
    """Temporary stand-in for marserve_kernels.moe until the kernels package provides it (tests only)."""
    import torch
    import torch.nn.functional as F
    out = torch.zeros_like(hidden)
    inter = w13.shape[1] // 2
    for e in topk_ids.unique().tolist():
        tok, slot = torch.where(topk_ids == e)
        h = hidden[tok] @ w13[e].t()
        act = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, (act @ w2[e].t()) * topk_weights[tok, slot, None])
    return out


def _ensure_moe_kernel():
    import marserve_kernels
    if not hasattr(marserve_kernels, "moe"):
        marserve_kernels.moe = _grouped_moe_reference


_ensure_moe_kernel()
