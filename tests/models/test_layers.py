"""RoPE scaling types against transformers' own tables; fused expert tensors and tied embeddings load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from marserve.attention import AttentionMetadata
from marserve.config import ModelConfig
from marserve.loader import load_model
from marserve.models.layers import RotaryEmbedding, rope_inv_freq

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rows_from_the_cpu_table_equal_the_computed_ones(dtype, monkeypatch):
    """CPU passes read cos/sin rows from a per-dtype table of the first positions; positions past it are
    computed. Both must give exactly what computing them gives."""
    monkeypatch.setattr(RotaryEmbedding, "TABLE_POSITIONS", 32)
    rope = RotaryEmbedding(16, 10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                           max_positions=64)
    inv, attn = rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 16}, 64)
    for positions in (torch.tensor([0, 5, 31, 7]), torch.tensor([3, 40, 63])):  # in the table; past it
        cos, sin = rope(positions, dtype)
        want_cos, want_sin = RotaryEmbedding._cos_sin(positions, inv, attn, dtype)
        assert cos.dtype == dtype and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert rope._tables[dtype][0].shape == (32, 16)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_rope_tables_match_transformers(scaling):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_theta": 10000.0, **scaling}
    hf_config = AutoConfig.for_model("qwen3_moe", hidden_size=64, num_attention_heads=4, head_dim=16,
                                     max_position_embeddings=256, rope_parameters=params)
    want_inv, want_attn = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
    ours = ModelConfig.from_dict(hf_config.to_dict() | {"num_experts": 4, "num_experts_per_tok": 2})
    assert ours.rope_scaling["rope_type"] == scaling["rope_type"]
    inv, attn = rope_inv_freq(16, ours.rope_theta, ours.rope_scaling, 256)
    torch.testing.assert_close(inv, want_inv.float(), atol=1e-7, rtol=1e-5)
    assert attn == pytest.approx(want_attn)


def test_legacy_rope_theta_and_scaling_fields():
    c = ModelConfig.from_dict({"model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "vocab_size": 10, "intermediate_size": 8,
                               "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 5e5,
                               "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_theta == 5e5 and c.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}


def _logits(model, ids=(1, 9, 40, 7, 120)):
    with torch.no_grad():
        h = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.dense([len(ids)]))
        return model.compute_logits(h)


def test_fused_expert_tensors_on_disk(baby_checkpoint, tmp_path):
    import shutil
    src = baby_checkpoint("olmoe")
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)
    with safe_open(dst / "model.safetensors", "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        gate = [t.pop(f"{p}.{e}.gate_proj.weight") for e in range(4)]
        up = [t.pop(f"{p}.{e}.up_proj.weight") for e in range(4)]
        down = [t.pop(f"{p}.{e}.down_proj.weight") for e in range(4)]
        t[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])  # [E, 2I, H]
        t[f"{p}.down_proj"] = torch.stack(down)  # [E, H, I]
    save_file(t, dst / "model.safetensors")
    fused, _ = load_model(dst, dtype="float32")
    per_expert, _ = load_model(src, dtype="float32")
    for a, b in zip(fused.moe_blocks(), per_expert.moe_blocks()):
        assert torch.equal(a.experts.w13, b.experts.w13) and torch.equal(a.experts.w2, b.experts.w2)
    torch.testing.assert_close(_logits(fused), _logits(per_expert), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_match_transformers(baby_checkpoint):
    from transformers import AutoModelForCausalLM
    path = baby_checkpoint("mixtral", config_overrides={"tie_word_embeddings": True})
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    model, _ = load_model(path, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([[1, 9, 40, 7, 120]])).logits[0]
    torch.testing.assert_close(_logits(model), want, atol=1e-4, rtol=1e-4)
