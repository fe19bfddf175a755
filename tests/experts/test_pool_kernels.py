"""The MoE kernels take a slot pool larger than the rows a call uses (ids remapped into it): every CPU path, and the
torch reference, give what they give on the compact weights of the experts named."""

import pytest
import torch

from marserve_kernels import cpu_moe, moe_reference


@pytest.mark.parametrize("path", ["native", "gemm", "reference"])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_pool_with_unused_rows(path, tokens):
    torch.manual_seed(0)
    E, S, H, I, K = 4, 11, 32, 48, 2
    w13, w2 = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    x = torch.randn(tokens, H)
    ids = torch.randint(0, E, (tokens, K))
    weights = torch.softmax(torch.randn(tokens, K), -1)
    slot_of = torch.tensor([7, 2, 9, 4])  # expert -> slot; the other slots hold garbage
    pool13, pool2 = torch.full((S, 2 * I, H), float("nan")), torch.full((S, H, I), float("nan"))
    pool13[slot_of], pool2[slot_of] = w13, w2
    want = moe_reference(x, w13, w2, weights, ids)
    if path == "native":
        if not cpu_moe._can_use_native(x, pool13, pool2):
            pytest.skip("no native MoE kernel here")
        from marserve_kernels import cpu_moe_native
        got = cpu_moe_native.small_moe(x, pool13, pool2, weights, slot_of[ids])
    elif path == "gemm":
        got = cpu_moe.gemm_moe(x, pool13, pool2, weights, slot_of[ids])
    else:
        got = moe_reference(x, pool13, pool2, weights, slot_of[ids])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
