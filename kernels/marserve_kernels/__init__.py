"""marserve_kernels: MoE compute paths behind one signature.

(hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, K], topk_ids [T, K]) -> [T, H]
- moe_reference: plain torch, differentiable (the definition).
- fused_moe: the fused Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1, for tests).
- moe: the path the MoE layer calls; picks the fastest available for the tensors: fused_moe on
  CUDA, the grouped CPU path on CPU. MARSERVE_MOE_BACKEND=triton|cpu|reference overrides the choice.
- moe_path: which of these moe() runs for a call (for callers that split one call's pairs across processes).
"""

from __future__ import annotations

import os

import torch

from marserve_kernels import cpu_moe
from marserve_kernels.cpu_moe import grouped_moe
from marserve_kernels.reference import moe_reference

__all__ = ["moe", "moe_reference", "grouped_moe", "fused_moe", "moe_path"]
BACKENDS = ("triton", "cpu", "reference")


def fused_moe(*args, **kwargs) -> torch.Tensor:
    """The fused Triton MoE (marserve_kernels/fused_moe_triton.py); imported on first use so CPU installs need no Triton."""
    from marserve_kernels.fused_moe_triton import fused_moe as triton_fused_moe
    return triton_fused_moe(*args, **kwargs)


def _backend(hidden: torch.Tensor) -> str:
    forced = os.environ.get("MARSERVE_MOE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MARSERVE_MOE_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    return "triton" if hidden.device.type == "cuda" else "cpu"


def _training(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def moe_path(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tokens: int, top_k: int,
             experts: int) -> str:
    """What moe() runs for a call of `tokens` tokens over `experts` experts shaped like w13/w2: "native" or
    "gemm" (grouped_moe's two CPU paths: fp32 sums rounded once, or per-expert GEMMs rounded per expert),
    "triton" or "reference". For a caller that splits one call's pairs and must take the whole call's path."""
    if _training(hidden, w13, w2):
        return "reference"
    backend = _backend(hidden)
    if backend != "cpu":
        return backend
    return "native" if cpu_moe.takes_native(hidden, w13, w2, tokens, top_k, experts) else "gemm"


def moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    if _training(hidden, w13, w2, topk_weights):
        # Training: the grouped path writes into buffers in place; the reference is differentiable.
        return moe_reference(hidden, w13, w2, topk_weights, topk_ids)
    backend = _backend(hidden)
    if backend == "triton":
        return fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    if backend == "reference":
        return moe_reference(hidden, w13, w2, topk_weights, topk_ids)
    return grouped_moe(hidden, w13, w2, topk_weights, topk_ids)
