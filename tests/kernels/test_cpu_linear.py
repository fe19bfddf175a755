import pytest
import torch
import torch.nn.functional as F

from marserve.models.layers import Linear
from marserve_kernels import cpu_linear
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
