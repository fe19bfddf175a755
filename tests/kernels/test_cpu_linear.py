import pytest
import torch
import torch.nn.functional as F

from marserve.models.layers import Linear
from marserve_kernels import cpu_features, cpu_linear
from marserve_kernels.cpu_linear import linear


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 5, 64), (0, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(dtype, tol, shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype) if with_bias else None
    want, got = F.linear(x, w, b), linear(x, w, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 8)


def test_linear_non_contiguous_input_and_fallbacks():
    x = torch.randn(4, 64)[:, :32]
    w = torch.randn(16, 32)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    x16, w16 = x.half(), w.half()  # not a oneDNN dtype here: F.linear's result exactly
    assert torch.equal(linear(x16, w16), F.linear(x16, w16))


def test_linear_is_differentiable_through_the_fallback():
    layer = Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_onednn_is_used_on_this_build():
    # The speed of the CPU path depends on it; a torch build without oneDNN would silently be ~2x slower.
    assert cpu_linear.ONEDNN


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_packed_weight_gives_the_same_products(dtype, tol, tokens):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(tokens, 64, generator=g).to(dtype)
    if not cpu_linear.onednn_runs(dtype):  # bf16 below AVX-512: pack refuses with a clear error
        with pytest.raises(ValueError, match="cannot pack"):
            cpu_linear.pack(w)
        pytest.skip(f"oneDNN runs no {dtype} on this CPU ({cpu_features.describe()})")
    packed = cpu_linear.pack(w)
    assert packed.is_mkldnn and packed.shape == w.shape and packed.dtype == dtype
    torch.testing.assert_close(linear(x, packed, b).float(), F.linear(x, w, b).float(), rtol=tol, atol=tol * 8)
    assert linear(x[:0], packed).shape == (0, 48)


@pytest.mark.parametrize("packed", [True, False])
def test_model_pack_for_cpu_keeps_logits_and_leaves_tied_weights(baby_checkpoint, packed):
    # packed=False: what the engine does when the native dense kernel is available (plain weights, q/k/v fused)
    from marserve.attention import AttentionMetadata
    from marserve.loader import load_model
    cases = (("qwen2_moe", {}), ("qwen3_moe", {}), ("olmoe", {"config_overrides": {"clip_qkv": 0.5}}),
             ("mixtral", {"config_overrides": {"tie_word_embeddings": True}}))
    for kind, kw in cases:  # attention biases, per-head and whole-projection q/k norms, clipping, tied head
        model, cfg = load_model(baby_checkpoint(kind, **kw), dtype="float32")
        ids = torch.arange(3, 3 + 9)
        with torch.inference_mode():
            want = model.compute_logits(model(ids, torch.arange(9), AttentionMetadata.dense([9])))
            count = model.pack_for_cpu(packed)
            got = model.compute_logits(model(ids, torch.arange(9), AttentionMetadata.dense([9])))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        if packed:
            assert count > 0 and all(m.weight.is_mkldnn for m in linears if m is not model.lm_head)
            assert model.lm_head.weight.is_mkldnn != cfg.tie_word_embeddings
        else:
            assert count == 0 and not any(m.weight.is_mkldnn for m in linears)
            assert all(m.weight.is_contiguous() for m in linears)
        attn = model.model.layers[0].self_attn
        assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")  # fused, the three released
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight


def test_model_pack_for_cpu_default_follows_the_native_kernel(baby_checkpoint):
    from marserve.loader import load_model
    from marserve_kernels import cpu_dense_native
    model, _ = load_model(baby_checkpoint("mixtral"), dtype="float32")
    native = cpu_linear.native_available(torch.float32)
    assert native == cpu_dense_native.available(torch.float32)
    with torch.inference_mode():
        count = model.pack_for_cpu()
    assert (count == 0) == native and hasattr(model.model.layers[0].self_attn, "qkv_proj")
