"""Native fused residual-add + RMSNorm against torch."""

from __future__ import annotations

import pytest
import torch

from marserve_kernels import cpu_norm_native as native

UNAVAILABLE = native.unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.mark.parametrize("T,H", [(1, 512), (3, 17), (64, 2048), (300, 512), (5, 1)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_reference(T, H, with_residual):
    g = torch.Generator().manual_seed(T * 1000 + H)
    x, w = torch.randn(T, H, generator=g) * 3, torch.randn(H, generator=g)
    residual = torch.randn(T, H, generator=g) if with_residual else None
    want, want_sum = native.add_rms_norm_reference(x, residual, w, 1e-6)
    before = x.clone()
    got = native.add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, before)  # x is only read
    if with_residual:
        torch.testing.assert_close(residual, want_sum, atol=0, rtol=0)  # the sum, in place


def test_what_it_does_not_take_goes_to_torch():
    x, w = torch.randn(2, 8), torch.randn(8)
    assert native.applies(x, w)
    assert not native.applies(x.bfloat16(), w.bfloat16())
    assert not native.applies(torch.randn(8, 2).t(), torch.randn(2))  # not contiguous
    with torch.enable_grad():
        assert not native.applies(x.requires_grad_(), w)
