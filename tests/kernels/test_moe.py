import pytest
import torch

from marserve_kernels import grouped_moe, moe, moe_reference


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


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (5, 4, 2), (17, 8, 2), (33, 8, 8), (3, 16, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paths_match_naive_loop(T, E, K, dtype):
    g = torch.Generator().manual_seed(T * 100 + E)
    H, I = 24, 40
    hidden = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    # Only the first half of the experts is ever picked: experts with zero tokens must be handled.
    topk_ids = torch.stack([torch.randperm(max(E // 2, K), generator=g)[:K] for _ in range(T)])
    topk_weights = torch.softmax(torch.randn(T, K, generator=g), -1)
    want = naive_loop(hidden.float(), w13.float(), w2.float(), topk_weights, topk_ids)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for fn in (moe_reference, grouped_moe, moe):
        got = fn(hidden, w13, w2, topk_weights, topk_ids).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


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
