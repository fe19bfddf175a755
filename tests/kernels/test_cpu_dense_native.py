import pytest
import torch
import torch.nn.functional as F

from marserve_kernels import cpu_dense_native, cpu_linear

UNAVAILABLE = cpu_dense_native.unavailable_reason(torch.float32) or cpu_dense_native.unavailable_reason(torch.bfloat16)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _check(x, w, b, threads, dtype):
    got = cpu_dense_native.small_linear(x, w, b, threads=threads)
    want = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    assert got.shape == want.shape and got.dtype == x.dtype
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 8 * x.shape[-1] ** 0.5 / 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 8, 9, 16, 17, 33, 47, 48, 61, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_linear_matches_f_linear(dtype, tokens, threads):
    # K = 1100: 16-lane steps and a 12-float tail; K = 2100: groups of 4 x rows too long for L1, so K-chunked
    # passes (and a 52-column last chunk in the transposed form); N odd, N < 4, N < one 32-row block.
    g = torch.Generator().manual_seed(tokens)
    for n, k, with_bias in ((37, 1100, True), (9, 2100, True), (5, 13, False), (64, 512, False), (1, 48, True)):
        x = torch.randn(tokens, k, generator=g)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g) if with_bias else None
        _check(x, w, b, threads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_linear_input_layouts_and_dtypes(dtype):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(21, 40, generator=g).to(dtype)
    b = torch.randn(21, generator=g).to(dtype)
    wide = torch.randn(6, 100, generator=g)
    _check(wide[:, 10:50], w, b, 2, dtype)  # rows strided (a column slice)
    _check(wide[:, 10:50].t().contiguous().t(), w, b, 2, dtype)  # column-major: copied
    _check(torch.randn(2, 3, 40, generator=g), w, None, 1, dtype)  # leading dims kept
    _check(torch.randn(4, 40, generator=g).to(dtype), w, b, 2, dtype)  # bf16 activations: bf16 out
    assert cpu_dense_native.small_linear(torch.randn(0, 40), w.float()).shape == (0, 21)
    _check(torch.randn(3, 0), torch.randn(21, 0).to(dtype), b, 2, dtype)  # K = 0: the bias alone
    _check(torch.randn(40, generator=g), w, b, 1, dtype)  # one token as a vector


def test_linear_takes_the_native_kernel_up_to_the_threshold(monkeypatch):
    calls = []
    real = cpu_dense_native.small_linear
    monkeypatch.setattr(cpu_dense_native, "small_linear", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    w = torch.randn(48, 64)
    limit = cpu_linear.NATIVE_MAX_TOKENS
    for tokens in (1, limit, limit + 1):
        x = torch.randn(tokens, 64)
        torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert calls == [(1, 64), (limit, 64)]
    cpu_linear.linear(torch.randn(1, 64), cpu_linear.pack(w))  # packed weights stay with oneDNN
    cpu_linear.linear(torch.randn(1, 32), w[:, :32])  # a non-contiguous weight too
    x = torch.randn(1, 64, requires_grad=True)
    cpu_linear.linear(x, w).sum().backward()  # autograd: F.linear
    assert len(calls) == 2 and x.grad is not None
