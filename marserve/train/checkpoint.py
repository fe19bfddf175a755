"""Writes a trained model as a MAR checkpoint directory (transformers tensor names + "mar" block) and the trainer's resume state."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from marserve.train.mar_router import MARSettings


def _mar_key_on_disk(model_type: str, key: str) -> str:
    # In memory every architecture's MoE block is `mlp`; mixtral checkpoints call it block_sparse_moe.
    if model_type == "mixtral":
        return key.replace(".mlp.mar.", ".block_sparse_moe.mar.")
    return key


def save_mar_checkpoint(model, out_dir: str, settings: MARSettings, dtype: torch.dtype = torch.float32,
                        tokenizer_dir: str | None = None) -> None:
    """save_pretrained (per-expert names, as transformers writes them), then MAR tensors and config "mar" block.

    Base weights go to disk in `dtype`; memory stays in `dtype` and usage in float32 (the spec's dtypes).
    """
    os.makedirs(out_dir, exist_ok=True)
    state = model.state_dict()
    mar_tensors = {k: v.detach().clone() for k, v in state.items() if ".mar." in k}
    model.save_pretrained(out_dir, safe_serialization=True)
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    model_type = model.config.model_type
    out = {}
    for k, v in tensors.items():
        if ".mar." in k:
            continue   # re-added below under the spec's names and dtypes
        out[k] = v.to(dtype) if v.is_floating_point() else v
    for k, v in mar_tensors.items():
        disk = _mar_key_on_disk(model_type, k)
        out[disk] = v.float() if k.endswith(".usage") else v.to(dtype)
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"format": "pt"})

    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    if settings.enabled:
        cfg["mar"] = {"version": 1, "memory_slots": settings.memory_slots,
                      "affinity_scale": settings.affinity_scale, "layers": None}
    else:
        cfg.pop("mar", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer_dir is not None and os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(tokenizer_dir, name)) as src, open(os.path.join(out_dir, name), "w") as dst:
                dst.write(src.read())


def load_mar_state_into(model, ckpt_dir: str) -> None:
    """Copies <block>.mar.* tensors of a checkpoint into a model that has had install_mar applied."""
    from safetensors import safe_open
    model_type = model.config.model_type
    wanted = {_mar_key_on_disk(model_type, k): k for k in model.state_dict() if ".mar." in k}
    if not wanted:
        return
    tensors = {}
    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith(".safetensors") and name.startswith("model"):
            with safe_open(os.path.join(ckpt_dir, name), "pt") as f:
                for k in f.keys():
                    if k in wanted:
                        tensors[wanted[k]] = f.get_tensor(k).float()
    missing = set(wanted.values()) - set(tensors)
    if missing:
        from marserve.errors import CheckpointError
        raise CheckpointError(f"{ckpt_dir}: MAR tensor {sorted(missing)[0]} is missing")
    model.load_state_dict(tensors, strict=False)
