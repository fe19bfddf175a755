"""CPU decode through the native decode layer (marserve.models.native_decode) gives the logits of the
module-by-module path, for every architecture and both model dtypes; and it is what runs by default."""

from __future__ import annotations

import pytest
import torch

from marserve.loader import load_model
from marserve.engine.model_runner import ModelRunner, ScheduledChunk
from marserve.models import native_decode
from marserve_kernels import cpu_decode_layer_native

UNAVAILABLE = cpu_decode_layer_native.unavailable_reason(torch.float32)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

CASES = {
    "mixtral": dict(),
    "qwen2_moe": dict(config_overrides={"mlp_only_layers": [1]}),  # qkv bias, shared expert, a dense layer
    "qwen3_moe": dict(mar=True),  # per-head q/k norms, MAR memory affinity in the router
    "olmoe": dict(config_overrides={"clip_qkv": 0.5}),  # whole-projection q/k norms, clipping
}


def _decode_logits(runner, prompts, tables, steps):
    """Prefill each prompt, then `steps` greedy decode steps of all of them together -> logits of each step."""
    out = runner.execute([ScheduledChunk(p, 0, t, True) for p, t in zip(prompts, tables)])
    seqs = [list(p) + [int(i)] for p, i in zip(prompts, out.argmax(-1))]
    history = []
    for _ in range(steps):
        out = runner.execute([ScheduledChunk(s[-1:], len(s) - 1, t, True) for s, t in zip(seqs, tables)])
        history.append(out)
        for s, i in zip(seqs, out.argmax(-1)):
            s.append(int(i))
    return history


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("form", ["stack", "layer"])
def test_native_decode_matches_the_modules(baby_checkpoint, monkeypatch, arch, dtype, form):
    """form "stack": the whole stack in one call (every layer MoE with resident experts; qwen2_moe's shared
    expert and dense layer keep it on the per-layer form); "layer": one call per layer's attention half."""
    model, cfg = load_model(baby_checkpoint(arch, **CASES[arch]), dtype=dtype)
    model.pack_for_cpu()  # what the engine does: q/k/v fused into one plain projection
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 2)]
    tables = [[3, 7, 1, 12], [0, 5, 9, 14], [2, 11, 4, 6]]  # scattered blocks of 4 slots
    if form == "layer":
        monkeypatch.setattr(native_decode, "stack_for", lambda model, dtype, num_seqs: None)

    calls = {"layer": 0, "stack": 0}
    for cls, name in ((cpu_decode_layer_native.DecodeLayer, "layer"), (cpu_decode_layer_native.DecodeStack, "stack")):
        def counted(self, *a, _real=cls.run, _name=name):
            calls[_name] += 1
            return _real(self, *a)
        monkeypatch.setattr(cls, "run", counted)
    lookups_before = sum(b.experts.stats.lookups for b in model.moe_blocks())
    native = _decode_logits(ModelRunner(model, cfg, block_size=4, num_blocks=16, dtype=getattr(torch, dtype)),
                            prompts, tables, 5)
    used = dict(calls)
    lookups = sum(b.experts.stats.lookups for b in model.moe_blocks()) - lookups_before
    monkeypatch.setattr(native_decode, "pass_applies", lambda x, meta: False)
    modules = _decode_logits(ModelRunner(model, cfg, block_size=4, num_blocks=16, dtype=getattr(torch, dtype)),
                             prompts, tables, 5)

    if form == "stack" and arch != "qwen2_moe":
        assert used == {"layer": 0, "stack": 5}  # one call per decode step, by default
    else:
        assert used == {"layer": 5 * cfg.num_hidden_layers, "stack": 0}
    assert calls == used  # and never on the module path
    # every routing decision of the prefill and the 5 decode steps reached the expert providers' counters
    blocks = len(model.moe_blocks())
    assert lookups == blocks * cfg.num_experts_per_tok * (sum(len(p) for p in prompts) + 5 * len(prompts))
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == "float32" else dict(atol=0.1, rtol=0.05)
    for a, b in zip(native, modules):
        torch.testing.assert_close(a, b, **tol)
        if dtype == "float32":
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_routing_observer_keeps_the_per_layer_form_and_sees_every_decision(baby_checkpoint, monkeypatch):
    """Routing analysis sets routing_observer on the blocks: decode then runs layer by layer (the whole-stack
    call would not hand each layer's router input out), and the observer sees every layer's decisions."""
    model, cfg = load_model(baby_checkpoint("qwen3_moe", mar=True), dtype="float32")
    model.pack_for_cpu()
    seen = []
    for block in model.moe_blocks():
        block.routing_observer = lambda layer, x, z, ids, w: seen.append((layer, x.shape[0], tuple(ids.shape)))
    stack_calls = []
    real = cpu_decode_layer_native.DecodeStack.run
    monkeypatch.setattr(cpu_decode_layer_native.DecodeStack, "run",
                        lambda self, *a: stack_calls.append(1) or real(self, *a))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 6)]
    _decode_logits(ModelRunner(model, cfg, block_size=4, num_blocks=16), prompts, [[1, 2, 3], [4, 5, 6]], 3)
    assert not stack_calls
    decode = [s for s in seen if s[1] == 2]  # the 3 decode steps of 2 sequences (the prefill pass has 9 rows)
    assert decode == [(i, 2, (2, cfg.num_experts_per_tok)) for _ in range(3) for i in range(cfg.num_hidden_layers)]


def test_passes_past_the_native_experts_crossover_take_the_per_layer_form(baby_checkpoint, monkeypatch):
    """Where per-expert GEMMs beat the native experts (cpu_moe.native_is_faster says no), the whole-stack call
    is skipped: each layer routes natively and hands its experts to marserve_kernels.moe."""
    from marserve_kernels import cpu_moe
    model, cfg = load_model(baby_checkpoint("mixtral"), dtype="float32")
    model.pack_for_cpu()
    monkeypatch.setattr(cpu_moe, "NATIVE_MAX_PAIRS_PER_EXPERT", {})
    monkeypatch.setattr(cpu_moe, "NATIVE_MAX_FLOPS", 0)
    assert native_decode.stack_for(model, torch.float32, 2) is None
    calls = []
    real = cpu_decode_layer_native.DecodeLayer.run
    monkeypatch.setattr(cpu_decode_layer_native.DecodeLayer, "run", lambda self, *a: calls.append(1) or real(self, *a))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 7)]
    native = _decode_logits(ModelRunner(model, cfg, block_size=4, num_blocks=16), prompts, [[1, 2, 3], [4, 5, 6]], 3)
    assert len(calls) == 3 * cfg.num_hidden_layers
    monkeypatch.setattr(native_decode, "pass_applies", lambda x, meta: False)
    modules = _decode_logits(ModelRunner(model, cfg, block_size=4, num_blocks=16), prompts, [[1, 2, 3], [4, 5, 6]], 3)
    for a, b in zip(native, modules):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
