"""Helpers for the expert-store tests: a stacked-layout copy of a baby checkpoint, the model sizes the budgets use."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Baby models big enough for every budget: 4 MoE layers of 8 experts, top-2 -> 32 experts, minimum 8 (25%).
SIZES = dict(num_layers=4, num_experts=8, top_k=2)


def stacked_copy(src: Path, dst: Path) -> Path:
    """A copy of a single-file per-expert checkpoint with each layer's experts stacked the transformers-5 way:
    experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and experts.down_proj [E, H, I]."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    per = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        m = per.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for prefix, parts in groups.items():
        E = 1 + max(e for e, _ in parts)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(E)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(E)])
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
