"""y = x @ W^T on CPU through oneDNN, which is much faster here than the MKL GEMM that F.linear uses.

Measured on this project's AMD EPYC machines (2 cores, fp32): MKL's sgemm/sgemv reach ~210 GFLOP/s and
~16 GB/s for one token, oneDNN's inner product ~470 GFLOP/s and ~37 GB/s on the same plain [N, K]
weights (no repacking, so no extra memory); `python -m marserve.bench.machine_limits` prints both.
F.linear stays the path for autograd, other devices and builds without oneDNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] | None -> [..., N]; same result as F.linear."""
    if (ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and weight.is_contiguous() and x.dim() >= 1 and x.shape[-1] == weight.shape[1]):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return x.new_empty(*lead, weight.shape[0])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return out.view(*lead, weight.shape[0])
    return F.linear(x, weight, bias)
