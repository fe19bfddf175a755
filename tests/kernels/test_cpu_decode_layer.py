"""The native decode layer (a layer's attention half plus routing in one call) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from marserve_kernels import cpu_decode_layer_native as native

UNAVAILABLE = native.unavailable_reason(torch.float32) or native.unavailable_reason(torch.bfloat16)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _weights(g, dtype, H, Hq, Hkv, D, E, K, *, qk_norm=None, bias=False, clip=None, mar_slots=0, renormalise=True):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)
    qk = {"head": (D, D), "full": (Hq * D, Hkv * D)}.get(qk_norm)
    return native.LayerWeights(
        ln1=1 + rand(H, scale=0.1), ln2=1 + rand(H, scale=0.1), eps=1e-5,
        qkv=rand((Hq + 2 * Hkv) * D, H, scale=H**-0.5), o=rand(H, Hq * D, scale=(Hq * D)**-0.5),
        num_heads=Hq, num_kv_heads=Hkv, head_dim=D, scale=D**-0.5,
        qkv_bias=rand((Hq + 2 * Hkv) * D, scale=0.1) if bias else None, qk_norm=qk_norm,
        q_norm=1 + rand(qk[0], scale=0.1) if qk else None, k_norm=1 + rand(qk[1], scale=0.1) if qk else None,
        qk_eps=1e-6, clip=clip, gate=rand(E, H, scale=H**-0.5) if E else None, top_k=K, renormalise=renormalise,
        mar_memory=torch.nn.functional.normalize(torch.randn(E, mar_slots, H, generator=g), dim=-1).to(dtype)
        if mar_slots else None, mar_scale=0.7 if mar_slots else 0.0)


def _paged(g, lens, S, Hkv, D, dtype, num_blocks=48):
    k_cache = torch.randn(num_blocks, S, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, S, Hkv, D, generator=g).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // S) for n in lens) + 1
    tables = torch.zeros((len(lens), width), dtype=torch.int64)
    slots = []
    for s, n in enumerate(lens):
        for b in range(-(-n // S)):
            tables[s, b] = free.pop()
        slots.append(int(tables[s, (n - 1) // S]) * S + (n - 1) % S)
    D2 = D // 2
    angles = torch.tensor(lens, dtype=torch.float32)[:, None] * torch.rand(D2, generator=g)[None]
    emb = torch.cat([angles, angles], -1)
    return k_cache, v_cache, tables, torch.tensor(slots), emb.cos(), emb.sin()


CASES = {  # name: (H, Hq, Hkv, D, E, K, options)
    "mixtral": (64, 8, 4, 16, 8, 2, {}),
    "qwen3-mar": (64, 4, 2, 32, 8, 2, dict(qk_norm="head", mar_slots=4)),
    "olmoe": (48, 4, 4, 16, 16, 4, dict(qk_norm="full", clip=1.5, renormalise=False)),
    "qwen2-bias": (64, 8, 2, 16, 6, 3, dict(bias=True, renormalise=False)),
    "dense-layer": (32, 4, 1, 16, 0, 0, {}),
    "wide": (512, 8, 4, 64, 16, 2, {}),  # rows past the 32-row thread split, real head dim
    "gqa16": (64, 16, 1, 16, 8, 2, {}),  # 16 query heads per KV head: the attention kernel's limit
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference(dtype, name, first, threads):
    H, Hq, Hkv, D, E, K, opts = CASES[name]
    g = torch.Generator().manual_seed(hash(name) % 1000)
    w = _weights(g, dtype, H, Hq, Hkv, D, E, K, **opts)
    lens = [1, 7, 16, 33, 3]
    S = 8
    k_cache, v_cache, tables, slots, cos, sin = _paged(g, lens, S, Hkv, D, dtype)
    B = len(lens)
    x = torch.randn(B, H, generator=g).to(dtype)
    residual = None if first else torch.randn(B, H, generator=g).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = native.decode_layer_reference(w, x, residual, cos, sin, k_ref, v_ref, tables, lens, slots)

    layer = native.DecodeLayer(w, dtype)
    p = layer.new_pass(cos, sin, tables, lens, slots, S)
    p.threads = threads
    got = layer.run(p, x, None if first else residual.clone(), k_cache, v_cache)

    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(k_cache.float(), k_ref.float(), **tol)
    torch.testing.assert_close(v_cache.float(), v_ref.float(), **tol)
    torch.testing.assert_close(got[1].float(), want[1].float(), **tol)  # residual stream
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)  # h, the MoE block's input
    if E == 0:
        assert got[2] is None and want[2] is None
        return
    z, weights, ids = got[2]
    z_ref, weights_ref, ids_ref = want[2]
    torch.testing.assert_close(z, z_ref, **tol)
    if dtype == torch.float32:  # bf16 rounding may swap two close experts; fp32 must pick the same ones
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(weights, weights_ref, atol=1e-5, rtol=1e-5)
    # Whatever it picked, the weights are those of its own choice under its logits.
    top = z.gather(1, ids)
    assert torch.all(top[:, :-1] >= top[:, 1:]) and torch.all(top[:, -1:] >= z.sort(1, descending=True)[0][:, K - 1:K])
    if opts.get("renormalise", True):
        expect = torch.softmax(top, -1)
    else:
        expect = torch.exp(top - torch.logsumexp(z, -1, keepdim=True))
    torch.testing.assert_close(weights, expect, atol=1e-5, rtol=1e-5)


def test_refuses_what_it_cannot_take():
    g = torch.Generator().manual_seed(0)
    w = _weights(g, torch.float32, 32, 6, 4, 16, 4, 2)  # 6 query heads over 4 KV heads: not a GQA group
    assert not native.supports(w, torch.float32)
    w = _weights(g, torch.float32, 32, 4, 2, 16, 4, 2)
    assert native.supports(w, torch.float32)
    assert not native.supports(w, torch.bfloat16)  # weights of another dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_stack_of_layers_with_their_experts_matches_reference(dtype, threads):
    """DecodeStack: every layer (attention half, routing and resident experts) in one call, against the
    reference layer by layer with moe_reference for the experts."""
    from marserve_kernels.reference import moe_reference
    g = torch.Generator().manual_seed(7)
    H, Hq, Hkv, D, E, K, I, S = 64, 4, 2, 16, 8, 2, 48, 8
    lens = [3, 12, 1, 20]
    weights = []
    for i in range(3):
        w = _weights(g, dtype, H, Hq, Hkv, D, E, K, qk_norm="head" if i == 1 else None, mar_slots=4 if i else 0)
        w.w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
        w.w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
        weights.append(w)
    caches = [_paged(torch.Generator().manual_seed(i), lens, S, Hkv, D, dtype) for i in range(3)]
    _, _, tables, slots, cos, sin = caches[0]
    kv = [(c[0], c[1]) for c in caches]
    kv_ref = [(k.clone(), v.clone()) for k, v in kv]
    x = torch.randn(len(lens), H, generator=g).to(dtype)

    want_x, residual, want_ids = x, None, []
    for w, (k_cache, v_cache) in zip(weights, kv_ref):
        h, residual, (z, topk_w, ids) = native.decode_layer_reference(w, want_x, residual, cos, sin, k_cache, v_cache,
                                                                      tables, lens, slots)
        want_x = moe_reference(h.float(), w.w13.float(), w.w2.float(), topk_w.to(dtype).float(), ids).to(dtype)
        want_ids.append(ids)

    stack = native.DecodeStack([native.DecodeLayer(w, dtype) for w in weights])
    p = stack.new_pass(cos, sin, tables, lens, slots, S)
    p.threads = threads
    out, got_residual, (z, topk_w, ids) = stack.run(p, x, kv)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(out.float(), want_x.float(), **tol)
    torch.testing.assert_close(got_residual.float(), residual.float(), **tol)
    for (k_cache, v_cache), (k_ref, v_ref) in zip(kv, kv_ref):
        torch.testing.assert_close(k_cache.float(), k_ref.float(), **tol)
        torch.testing.assert_close(v_cache.float(), v_ref.float(), **tol)
    if dtype == torch.float32:
        assert torch.equal(ids, torch.stack(want_ids))


def test_stack_refuses_layers_without_their_experts():
    g = torch.Generator().manual_seed(0)
    w = _weights(g, torch.float32, 32, 4, 2, 16, 4, 2)
    with pytest.raises(ValueError):
        native.DecodeStack([native.DecodeLayer(w, torch.float32)])


def test_many_sequences_take_the_outer_product_form():
    """48+ sequences: the projections switch to cpu_dense_small's outer-product form inside the layer call."""
    g = torch.Generator().manual_seed(3)
    H, Hq, Hkv, D, E, K = 64, 4, 2, 16, 8, 2
    w = _weights(g, torch.float32, H, Hq, Hkv, D, E, K, mar_slots=2)
    lens = [1 + (i * 7) % 30 for i in range(53)]
    k_cache, v_cache, tables, slots, cos, sin = _paged(g, lens, 8, Hkv, D, torch.float32, num_blocks=300)
    x, residual = torch.randn(53, H, generator=g), torch.randn(53, H, generator=g)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = native.decode_layer_reference(w, x, residual, cos, sin, k_ref, v_ref, tables, lens, slots)
    layer = native.DecodeLayer(w, torch.float32)
    got = layer.run(layer.new_pass(cos, sin, tables, lens, slots, 8), x, residual.clone(), k_cache, v_cache)
    for a, b in zip(got[:2] + got[2], want[:2] + want[2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_cache, k_ref, atol=1e-5, rtol=1e-5)
