import pytest
import torch
from marserve_kernels import cpu_features, cpu_moe, cpu_moe_native, grouped_moe, moe, moe_reference
from marserve_kernels.cpu_moe import gemm_moe

UNAVAILABLE = cpu_moe_native.unavailable_reason(torch.float32) or cpu_moe_native.unavailable_reason(torch.bfloat16)


def small_moe(*args):
    """The native few-token kernel called directly (grouped_moe only picks it for small T*K)."""
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    return cpu_moe_native.small_moe(*args)


def naive_loop(hidden, w13, w2, topk_weights, topk_ids):
    """Loop over every (token, slot): the most literal reading of the MoE formula."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            g, u = (w13[e] @ hidden[t]).split(inter)
            out[t] += topk_weights[t, k] * (w2[e] @ (torch.nn.functional.silu(g) * u))
    return out


def _case(T, E, K, H, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    # Only the first half of the experts is ever picked: experts with zero tokens must be handled.
    topk_ids = torch.stack([torch.randperm(max(E // 2, K), generator=g)[:K] for _ in range(T)])
    topk_weights = torch.softmax(torch.randn(T, K, generator=g), -1)
    return hidden, w13, w2, topk_weights, topk_ids


# H and I: not multiples of the kernel's 16 lanes (scalar tails), multiples (vector loops only), odd H
# (the down kernel pairs rows); T*K up to 264 pairs on 4 experts (the native kernel's groups of 8).
SHAPES = [(1, 4, 1, 24, 40), (5, 4, 2, 24, 40), (17, 8, 2, 24, 40), (33, 8, 8, 24, 40), (3, 16, 4, 24, 40),
          (7, 6, 3, 64, 48), (2, 4, 2, 33, 17), (40, 8, 2, 128, 96)]


@pytest.mark.parametrize("T,E,K,H,I", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paths_match_naive_loop(T, E, K, H, I, dtype):
    hidden, w13, w2, topk_weights, topk_ids = _case(T, E, K, H, I, dtype, seed=T * 100 + E)
    want = naive_loop(hidden.float(), w13.float(), w2.float(), topk_weights, topk_ids)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    paths = [moe_reference, grouped_moe, moe, gemm_moe, small_moe]
    for fn in paths:
        got = fn(hidden, w13, w2, topk_weights, topk_ids).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, name=fn.__name__: f"{name}: {m}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernel_splits_work_across_threads(threads):
    # Wide enough (I, H >= 64) that the columns are really split between threads.
    hidden, w13, w2, topk_weights, topk_ids = _case(9, 8, 2, 80, 72, torch.float32, seed=threads)
    want = moe_reference(hidden, w13, w2, topk_weights, topk_ids)
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    got = cpu_moe_native.small_moe(hidden, w13, w2, topk_weights, topk_ids, threads=threads)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_moe_picks_native_for_few_tokens_and_gemms_for_many(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_moe_native, "small_moe", lambda *a, **k: calls.append("native") or moe_reference(*a))
    monkeypatch.setattr(cpu_moe_native, "available", lambda dtype: dtype in (torch.float32, torch.bfloat16))
    monkeypatch.setattr(cpu_moe, "NATIVE_MAX_FLOPS", 0)  # decide by pairs per expert alone
    hidden, w13, w2, topk_weights, topk_ids = _case(2, 8, 2, 24, 40, torch.float32, seed=0)
    moe(hidden, w13, w2, topk_weights, topk_ids)
    assert calls == ["native"]
    many = _case(160, 8, 2, 24, 40, torch.float32, seed=1)  # 40 pairs per expert: GEMM territory
    moe(*many)
    moe(*_case(2, 8, 2, 24, 40, torch.float16, seed=2))  # the native kernel has fp32 and bf16 weights only
    assert calls == ["native"]
    moe(*_case(2, 8, 2, 24, 40, torch.bfloat16, seed=3))
    assert calls == ["native", "native"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_activations_saturate_silu_exactly(dtype):
    # Gate values far beyond the vector exp's clamps (|g| ~ 100s): SiLU must give ~0 and ~g, never inf/nan.
    hidden, w13, w2, topk_weights, topk_ids = _case(12, 4, 2, 32, 48, dtype, seed=7)
    hidden = hidden * 40
    want = naive_loop(hidden.float(), w13.float(), w2.float(), topk_weights, topk_ids)
    for fn in (moe, small_moe):
        got = fn(hidden, w13, w2, topk_weights, topk_ids).float()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3 if dtype == torch.float32
                                   else 5e-2)


def test_native_kernel_rejects_expert_ids_out_of_range():
    hidden, w13, w2, topk_weights, topk_ids = _case(3, 4, 2, 24, 40, torch.float32, seed=8)
    topk_ids[1, 0] = 4
    with pytest.raises(ValueError, match="above 3"):
        small_moe(hidden, w13, w2, topk_weights, topk_ids)


@pytest.mark.parametrize("inter", [24, 1100])  # 1100: groups of 6 pairs cut I in chunks (nb * I > L1_FLOATS)
def test_native_kernel_skips_negative_ids_and_keeps_the_other_pairs_exact(inter):
    # Expert parallelism splits a call's pairs between ranks by giving the other rank's slots id -1: each part
    # must compute its pairs bit for bit as the whole call does (same groups of pairs per expert, one rounded
    # product per pair added to the sum), so two fp32 partials add up exactly to the whole call's fp32 sum
    # (K=2: one expert per part, or both in one).
    hidden, w13, w2, topk_weights, topk_ids = _case(20, 4, 2, 40, inter, torch.bfloat16, seed=11)
    topk_ids = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(t))[:2] for t in range(20)])
    x = hidden.float()  # fp32 hidden: the kernel's fp32 sums come back unrounded
    whole = small_moe(x, w13, w2, topk_weights, topk_ids)
    held = topk_ids % 2 == 0  # one part holds experts 0 and 2, the other 1 and 3
    parts = [small_moe(x, w13, w2, topk_weights, torch.where(mine, topk_ids, -1)) for mine in (held, ~held)]
    assert torch.equal(parts[0] + parts[1], whole)
    # The GEMM path (bf16 per expert, slots added in bf16): each part's experts see the rows of the whole call,
    # so the parts' bf16 terms added once in fp32 and rounded give the whole call's bf16 sum.
    whole = gemm_moe(hidden, w13, w2, topk_weights, topk_ids)
    parts = [gemm_moe(hidden, w13, w2, topk_weights, torch.where(mine, topk_ids, -1)) for mine in (held, ~held)]
    assert torch.equal((parts[0].float() + parts[1].float()).to(torch.bfloat16), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_give_the_same_result_and_follow_weight_changes(dtype):
    if not cpu_moe.cpu_linear.can_pack(torch.empty(2, 2, dtype=dtype)):
        pytest.skip(f"oneDNN packs no {dtype} weights on this CPU ({cpu_features.describe()})")
    hidden, w13, w2, topk_weights, topk_ids = _case(40, 4, 2, 32, 48, dtype, seed=9)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    want = naive_loop(hidden.float(), w13.float(), w2.float(), topk_weights, topk_ids)
    assert cpu_moe.pack_experts(w13, w2) == (w13.numel() + w2.numel()) * w13.element_size()
    try:
        assert cpu_moe._packed_for(w13, w2) is not None
        got = gemm_moe(hidden, w13, w2, topk_weights, topk_ids).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        with torch.no_grad():
            w2.mul_(2)  # in place: the packed copies are stale and must not be used
        got = gemm_moe(hidden, w13, w2, topk_weights, topk_ids).float()
        torch.testing.assert_close(got, 2 * want, atol=2 * tol, rtol=tol)
        assert cpu_moe._packed_for(w13, w2) is None
    finally:
        cpu_moe.unpack_experts(w13, w2)


def test_zero_tokens():
    _, w13, w2, _, _ = _case(1, 4, 2, 24, 40, torch.float32, seed=0)
    out = moe(torch.empty(0, 24), w13, w2, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.long))
    assert out.shape == (0, 24)


def test_moe_is_differentiable_when_training():
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    w13 = torch.randn(4, 12, 8, requires_grad=True)
    w2 = torch.randn(4, 8, 6, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3], [1, 0], [3, 2]])
    weights = torch.softmax(torch.randn(6, 2), -1)
    moe(hidden, w13, w2, weights, ids).sum().backward()
    assert hidden.grad is not None and w13.grad is not None and w2.grad.abs().sum() > 0
    assert w13.grad[0].abs().sum() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_path_on_worker_threads_under_inference_mode(threads):
    # Workers are other threads: inference/grad modes are thread-local and must follow the caller.
    hidden, w13, w2, topk_weights, topk_ids = _case(50, 8, 2, 24, 40, torch.float32, seed=5)
    want = naive_loop(hidden, w13, w2, topk_weights, topk_ids)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = gemm_moe(hidden, w13, w2, topk_weights, topk_ids)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

