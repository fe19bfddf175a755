"""MAR routing equals the checkpoint-format formula; affinity_scale=0 is the plain model; dense layers and observers."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from marserve.attention import AttentionMetadata
from marserve.loader import load_model
from tests.baby_models import MODEL_TYPES, mar_key

IDS = [1, 7, 50, 99, 3, 200, 14, 31, 8, 250]


def _run(model, ids=IDS):
    with torch.no_grad():
        h = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.dense([len(ids)]))
        return model.compute_logits(h)


def _record(model):
    seen = {}
    for block in model.moe_blocks():
        block.routing_observer = lambda i, x, z, ids, w: seen.__setitem__(i, (x, z, ids, w))
    return seen


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mar_routing_equals_formula(baby_checkpoint, model_type):
    path = baby_checkpoint(model_type, mar=True, affinity_scale=2.0)
    model, config = load_model(path, dtype="float32")
    seen = _record(model)
    _run(model)
    files = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    block = config.moe_block_name
    for i, (x, z, ids, w) in seen.items():
        with safe_open(path / files[mar_key(model_type, i, "memory")], "pt") as f:
            memory = f.get_tensor(mar_key(model_type, i, "memory"))
        with safe_open(path / files[f"model.layers.{i}.{block}.gate.weight"], "pt") as f:
            gate = f.get_tensor(f"model.layers.{i}.{block}.gate.weight")
        # The spec, written out directly: z = Wx + beta * max_s <x/|x|, m_es>.
        xn = x / x.norm(dim=-1, keepdim=True)
        a = torch.stack([(memory[e] @ xn.T).max(dim=0).values for e in range(memory.shape[0])], dim=1)
        want_z = x @ gate.T + 2.0 * a
        torch.testing.assert_close(z, want_z, atol=1e-5, rtol=1e-5)
        probs = F.softmax(want_z, dim=-1)
        top, want_ids = probs.topk(config.num_experts_per_tok, dim=-1)
        if model_type in ("mixtral", "qwen3_moe"):  # these baby configs renormalise the top-k
            top = F.softmax(want_z.gather(1, want_ids), dim=-1)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, top, atol=1e-6, rtol=1e-5)
        assert a.abs().max() <= 1.0 + 1e-5
    assert len(seen) == config.num_hidden_layers
    # With beta = 2 the memory changes some routing decision relative to the plain model.
    plain, _ = load_model(baby_checkpoint(model_type), dtype="float32")
    assert not torch.allclose(_run(plain), _run(model), atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_affinity_scale_zero_is_plain_model(baby_checkpoint, model_type):
    mar, config = load_model(baby_checkpoint(model_type, mar=True, affinity_scale=0.0), dtype="float32")
    plain, _ = load_model(baby_checkpoint(model_type), dtype="float32")
    assert config.mar is not None and config.mar.affinity_scale == 0.0
    torch.testing.assert_close(_run(mar), _run(plain), atol=0, rtol=0)


def test_mar_on_listed_layers_only(baby_checkpoint):
    model, config = load_model(baby_checkpoint("olmoe", mar=True, mar_layers=[1]), dtype="float32")
    assert [b.has_mar for b in model.moe_blocks()] == [False, True]
    assert config.has_mar(1) and not config.has_mar(0)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_dense_mlp_layers_match_transformers(baby_checkpoint, model_type):
    from transformers import AutoModelForCausalLM
    path = baby_checkpoint(model_type, num_layers=3, config_overrides={"mlp_only_layers": [1]})
    model, config = load_model(path, dtype="float32")
    assert [config.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert len(model.moe_blocks()) == 2
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(_run(model), want, atol=1e-4, rtol=1e-4)


def test_router_logits_stay_differentiable(baby_checkpoint):
    model, _ = load_model(baby_checkpoint("mixtral", mar=True), dtype="float32")
    block = model.moe_blocks()[0]
    block.gate.weight.requires_grad_(True)
    x = torch.randn(5, model.config.hidden_size)
    block.router_logits(x).sum().backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
