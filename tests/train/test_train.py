"""Trains baby MoEs for 20 steps and checks the written MAR checkpoint against the format spec and transformers."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from marserve.data.corpus import EOT, math_docs, records_docs
from marserve.train.mar_router import MARSettings
from marserve.train.tokenizer import save_tokenizer, train_tokenizer
from marserve.train.trainer import ModelShape, TrainConfig, load_trained, train

E, K, S, H = 4, 2, 3, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    code = open(os.path.join(os.path.dirname(random.__file__), "bisect.py")).read()
    texts = {"math": EOT.join(math_docs(rng, 200)), "records": EOT.join(records_docs(rng, 60)), "code": code * 3}
    for name, text in texts.items():
        (d / f"{name}.train.txt").write_text(text)
    tok = train_tokenizer(sorted(str(p) for p in d.glob("*.train.txt")), vocab_size=320)
    save_tokenizer(tok, str(d / "tok"), model_max_length=128)
    return d


def _cfg(corpus, out, model_type="qwen3_moe", mar=True, **kw):
    shape = ModelShape(model_type=model_type, vocab_size=320, hidden_size=H, num_layers=2, num_heads=2,
                       num_kv_heads=1, num_experts=E, top_k=K, expert_intermediate=32, max_position=128)
    opts = dict(steps=20, batch_size=2, seq_len=32, warmup=2, save_every=10, save_dtype="float32", progress=False)
    opts.update(kw)
    return TrainConfig(corpus_dir=str(corpus), out_dir=str(out), tokenizer_dir=str(corpus / "tok"), shape=shape,
                       mar=MARSettings(enabled=mar, memory_slots=S, affinity_scale=1.5, memory_decay=0.9), **opts)


def _tensors(out):
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def mar_ckpt(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mar")
    summary = train(_cfg(corpus, out))
    return out, summary


def test_checkpoint_layout_and_mar_buffers(mar_ckpt):
    out, summary = mar_ckpt
    cfg = json.load(open(out / "config.json"))
    assert cfg["mar"] == {"version": 1, "memory_slots": S, "affinity_scale": 1.5, "layers": None}
    assert os.path.exists(out / "tokenizer.json")
    assert "chat_template" in json.load(open(out / "tokenizer_config.json"))
    t = _tensors(out)
    for i in range(2):
        # per-expert names, as transformers writes them to disk
        for e in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" in t
        mem, usage = t[f"model.layers.{i}.mlp.mar.memory"], t[f"model.layers.{i}.mlp.mar.usage"]
        assert mem.shape == (E, S, H) and usage.shape == (E,) and usage.dtype == torch.float32
        assert torch.allclose(mem.float().norm(dim=-1), torch.ones(E, S), atol=1e-4)
        assert abs(float(usage.sum()) - 1.0) < 1e-5
        # the memory moved away from its random start toward the routed inputs: slots are not all alike
        assert not torch.allclose(usage, torch.full((E,), 1.0 / E))
    log = json.load(open(out / "train_log.json"))["log"]
    assert len(log) == 20 and log[-1]["loss"] < log[0]["loss"]


def test_transformers_loads_base_weights(mar_ckpt):
    from transformers import AutoModelForCausalLM
    out, _ = mar_ckpt
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == [] or set(info["missing_keys"]) <= {"lm_head.weight"}
    assert all(".mar." in k for k in info["unexpected_keys"])
    t = _tensors(out)
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.mlp.gate.weight"], t["model.layers.1.mlp.gate.weight"])
    fused = sd["model.layers.0.mlp.experts.gate_up_proj"]          # transformers fuses experts in memory
    assert torch.equal(fused[2, :32], t["model.layers.0.mlp.experts.2.gate_proj.weight"])


def test_mar_routing_matches_spec(mar_ckpt, corpus):
    out, _ = mar_ckpt
    model, routers = load_trained(str(out))
    seen = {}
    for r in routers:
        r.routing_observer = lambda l, x, z, ids, w: seen.setdefault(l, (x, z, ids, w))
    model(input_ids=torch.randint(0, 320, (1, 24)))
    t = _tensors(out)
    for layer, (x, z, ids, w) in seen.items():
        W = t[f"model.layers.{layer}.mlp.gate.weight"].float()
        mem = t[f"model.layers.{layer}.mlp.mar.memory"].float()
        a = torch.einsum("th,esh->tes", F.normalize(x, dim=-1), mem).amax(-1)
        z_ref = x @ W.t() + 1.5 * a
        assert torch.allclose(z, z_ref, atol=1e-5)
        top_val, top_ids = torch.topk(z_ref, K, dim=-1)
        assert torch.equal(ids.sort(-1).values, top_ids.sort(-1).values)
        assert torch.allclose(w, torch.softmax(top_val, dim=-1), atol=1e-5)   # qwen3_moe, norm_topk_prob


def test_resume_is_deterministic(corpus, tmp_path, mar_ckpt):
    out, _ = mar_ckpt
    train(_cfg(corpus, tmp_path, stop_at=10))
    assert not os.path.exists(tmp_path / "model.safetensors")
    train(_cfg(corpus, tmp_path))                                   # resumes from step 10
    a, b = _tensors(out), _tensors(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_no_mar_twin_is_plain_transformers(corpus, tmp_path, model_type):
    train(_cfg(corpus, tmp_path, model_type=model_type, mar=False, steps=4))
    assert "mar" not in json.load(open(tmp_path / "config.json"))
    assert not any(".mar." in k for k in _tensors(tmp_path))
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours, _ = load_trained(str(tmp_path))
    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


def test_mixtral_mar_tensors_use_block_sparse_moe_names(corpus, tmp_path):
    train(_cfg(corpus, tmp_path, model_type="mixtral", steps=3))
    names = _tensors(tmp_path)
    assert "model.layers.0.block_sparse_moe.mar.memory" in names
    model, routers = load_trained(str(tmp_path))   # and they load back into the block
    assert torch.allclose(routers[0]._state.memory, names["model.layers.0.block_sparse_moe.mar.memory"].float())


def test_marserve_engine_routes_like_the_trainer(mar_ckpt):
    """Both sides of the MAR contract: the engine's model reproduces the trainer's MAR logits on its checkpoint."""
    loader = pytest.importorskip("marserve.loader")
    from marserve.attention import AttentionMetadata
    out, _ = mar_ckpt
    model, config = loader.load_model(out, dtype="float32")
    assert config.mar is not None and config.mar.memory_slots == S
    ref, _ = load_trained(str(out))
    prompt = list(range(3, 40))
    with torch.no_grad():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), AttentionMetadata.dense([len(prompt)]))
        got = model.compute_logits(hidden)
        want = ref(input_ids=torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
