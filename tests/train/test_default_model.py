"""The shipped default model: a valid MAR checkpoint under 32 MB that loads and generates in under 5 s on a CPU."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from marserve.analysis.routing import DEFAULT_MODEL_DIR


def test_default_model_files_and_mar_tensors():
    names = os.listdir(DEFAULT_MODEL_DIR)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert f in names
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f)) for f in names)
    assert size <= 32 * 2**20
    cfg = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "config.json")))
    assert cfg["mar"]["version"] == 1
    with safe_open(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors"), "pt") as f:
        for i in range(cfg["num_hidden_layers"]):
            usage = f.get_tensor(f"model.layers.{i}.mlp.mar.usage")
            mem = f.get_tensor(f"model.layers.{i}.mlp.mar.memory").float()
            assert usage.dtype == torch.float32 and abs(float(usage.sum()) - 1) < 1e-4
            assert torch.allclose(mem.norm(dim=-1), torch.ones(mem.shape[:2]), atol=1e-2)   # bf16 rounding


def test_default_model_generates_through_marserve():
    # Speed (load + generate in under 5 s) is measured by `time marserve generate`, not asserted here.
    from marserve import LLM, SamplingParams
    llm = LLM(str(DEFAULT_MODEL_DIR))
    out = llm.generate(["12 + 7 = 19\n30 - 4 ="], SamplingParams(max_tokens=32, temperature=0))[0]
    text = out.outputs[0].text
    assert len(out.outputs[0].token_ids) > 0
    # the arithmetic domain is the easiest to recognise: the continuation keeps the "a op b = c" shape
    assert any(op in text for op in ("+", "-", "*", "/")) and "=" in text, text
