"""The Triton MoE kernels (under TRITON_INTERPRET=1 on CPU) against their torch references."""

from __future__ import annotations

import pytest
import torch

import marserve_kernels
from marserve_kernels.fused_moe_config import config_file_name, default_config, get_config
from marserve_kernels.fused_moe_triton import fused_moe
from marserve_kernels.moe_align import moe_align_block_size, moe_align_block_size_reference
from marserve_kernels.reference import moe_reference

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _routing(T, E, K, g, skip_experts=()):
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), -1)
    return ids, weights


@pytest.mark.parametrize("T,E,K,block_m", [(1, 4, 1, 4), (5, 5, 2, 4), (13, 8, 3, 16), (33, 6, 6, 8), (3, 9, 8, 16)])
def test_moe_align_matches_reference(T, E, K, block_m):
    g = torch.Generator().manual_seed(T * 100 + E)
    ids, _ = _routing(T, E, K, g, skip_experts=(E - 1,))  # one expert gets no pair at all
    got = moe_align_block_size(ids, E, block_m)
    want = moe_align_block_size_reference(ids, E, block_m)
    n = int(want[2])
    assert int(got[2]) == n and n % block_m == 0
    assert torch.equal(got[1], want[1])  # the expert of every row block (-1 past the end)
    P = ids.numel()
    for b in range(n // block_m):  # same pairs per block (atomics may order them differently)
        rows = slice(b * block_m, (b + 1) * block_m)
        assert sorted(got[0][rows].tolist()) == sorted(want[0][rows].tolist())
    assert (got[0][n:] == P).all()
    flat = ids.reshape(-1)
    real = want[0][:n][want[0][:n] < P].long()
    expert_of_row = want[1].repeat_interleave(block_m)[:n][want[0][:n] < P]
    assert torch.equal(flat[real], expert_of_row.long())  # each pair sits in its expert's blocks
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (7, 5, 2), (19, 8, 3), (4, 8, 8)])
def test_fused_moe_matches_reference(dtype, T, E, K):
    g = torch.Generator().manual_seed(T + 10 * E + K)
    H, I = 40, 24  # not multiples of the block sizes: edge masks are exercised
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    ids, weights = _routing(T, E, K, g, skip_experts=(1,) if E - 1 >= K else ())
    got = fused_moe(x, w13, w2, weights, ids)
    want = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.dtype == dtype and got.shape == (T, H)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_router_weight_on_input_and_empty_batch():
    g = torch.Generator().manual_seed(3)
    T, H, I, E = 6, 32, 16, 4
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    ids, _ = _routing(T, E, 1, g)
    weights = torch.rand(T, 1, generator=g)
    got = fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=True)
    want = moe_reference(x * weights, w13, w2, torch.ones_like(weights), ids)  # the weight scales the input
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, torch.rand(T, 2), torch.zeros(T, 2, dtype=torch.long), apply_router_weight_on_input=True)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, H)


def test_configs_nearest_token_count_and_default(tmp_path):
    import json
    name = config_file_name(8, 24, "cpu", torch.float32)
    (tmp_path / name).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16},
                                             "64": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32}}))
    assert get_config(8, 24, torch.float32, 3, "cpu", config_dir=tmp_path)["BLOCK_SIZE_M"] == 16
    assert get_config(8, 24, torch.float32, 50, "cpu", config_dir=tmp_path)["BLOCK_SIZE_M"] == 32
    assert get_config(8, 99, torch.float32, 50, "cpu", config_dir=tmp_path) == default_config(50, 8, "cpu")
    assert default_config(4096, 8)["BLOCK_SIZE_M"] > default_config(1, 8)["BLOCK_SIZE_M"]
    x, w13, w2 = torch.randn(5, 32), torch.randn(8, 48, 32) / 6, torch.randn(8, 32, 24) / 5
    ids, weights = torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    cfg = {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16}  # any config gives the same result
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, config=cfg),
                               moe_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-4)


def test_tuning_refuses_without_a_gpu(capsys):
    from marserve_kernels import tune
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tuning would run")
    assert tune.main(["--experts", "4", "--hidden", "8", "--intermediate", "8"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_backend_override(monkeypatch):
    x, w13, w2 = torch.randn(3, 16), torch.randn(4, 16, 16) / 4, torch.randn(4, 16, 8) / 3
    ids, weights = torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    want = moe_reference(x, w13, w2, weights, ids)
    for backend in ("triton", "cpu", "reference"):
        monkeypatch.setenv("MARSERVE_MOE_BACKEND", backend)
        torch.testing.assert_close(marserve_kernels.moe(x, w13, w2, weights, ids), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("MARSERVE_MOE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError):
        marserve_kernels.moe(x, w13, w2, weights, ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_weight_on_input_half_precision(dtype):
    g = torch.Generator().manual_seed(11)
    T, H, I, E = 9, 24, 40, 5
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    ids, _ = _routing(T, E, 1, g, skip_experts=(2,))
    weights = torch.rand(T, 1, generator=g) + 0.5  # far from 1: a weight applied twice or not at all shows
    got = fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=True)
    want = moe_reference((x.float() * weights).to(dtype).float(), w13.float(), w2.float(), torch.ones_like(weights), ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])
    after = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)  # SiLU is not linear: placement matters
    assert not torch.allclose(got.float(), after, rtol=TOL[dtype], atol=TOL[dtype])


def test_inputs_that_do_not_fit_are_refused():
    x, w13, w2 = torch.randn(3, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    ids, weights = torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    cases = {
        "w13": (x, torch.randn(4, 16, 12), w2, weights, ids),  # H of w13 differs from hidden's
        "w2": (x, w13, torch.randn(4, 16, 9), weights, ids),  # I of w2 differs from w13's
        "topk": (x, w13, w2, weights[:2], ids[:2]),  # fewer routing rows than tokens
        "cast": (x, w13.half(), w2.half(), weights, ids),  # fp32 activations, fp16 weights
        "integer": (x, w13, w2, weights, ids.float()),
    }
    for what, args in cases.items():
        with pytest.raises(ValueError, match=what):
            fused_moe(*args)


def test_pairs_with_out_of_range_expert_ids_add_nothing():
    g = torch.Generator().manual_seed(5)
    T, H, I, E, K = 7, 24, 16, 4, 2
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    ids, weights = _routing(T, E, K, g)
    ids[1, 0], ids[4, 1], ids[6, 0], ids[6, 1] = -1, E, -3, E + 7  # token 6 has no expert at all
    for block_m in (4, 16):
        got, want = moe_align_block_size(ids, E, block_m), moe_align_block_size_reference(ids, E, block_m)
        n = int(want[2])
        assert int(got[2]) == n and torch.equal(got[1], want[1])
        assert sorted(got[0][:n].tolist()) == sorted(want[0][:n].tolist())
        kept = sorted(p for p in want[0][:n].tolist() if p < ids.numel())
        assert kept == [p for p in range(ids.numel()) if 0 <= ids.reshape(-1)[p] < E]
    dropped = (ids < 0) | (ids >= E)
    want = moe_reference(x, w13, w2, weights.masked_fill(dropped, 0.0), ids.masked_fill(dropped, 0))
    got = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got[6].abs().max() == 0


@pytest.mark.parametrize("content,complaint", [
    ({"16": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 24, "BLOCK_SIZE_K": 32}}, "BLOCK_SIZE_N=24"),  # not a power of 2
    ({"16": {"BLOCK_SIZE_M": 8, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}}, "BLOCK_SIZE_M=8"),  # below tl.dot's 16
    ({"16": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32}}, "BLOCK_SIZE_K=None"),
    ({"16": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "num_warps": 3}}, "num_warps=3"),
    ({"many": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}}, "token count"),
    ({}, "no token counts"),
])
def test_bad_config_files_are_refused_with_the_entry_named(tmp_path, content, complaint):
    import json
    E, N = 3, 7 + len(json.dumps(content))  # a file name of its own: the loader caches per path
    (tmp_path / config_file_name(E, N, "cpu", torch.float16)).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=complaint):
        get_config(E, N, torch.float16, 16, "cpu", config_dir=tmp_path)


def test_extra_keys_are_ignored_and_a_bad_config_argument_refused():
    x, w13, w2 = torch.randn(4, 16), torch.randn(4, 32, 16) / 4, torch.randn(4, 16, 16) / 4
    ids, weights = torch.randint(0, 4, (4, 2)), torch.rand(4, 2)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 8}
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, config=cfg),
                               moe_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="config=.*BLOCK_SIZE_K=12"):
        fused_moe(x, w13, w2, weights, ids, config={"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 12})


def test_strided_weights_and_hidden_are_read_in_place():
    g = torch.Generator().manual_seed(8)
    T, H, I, E, K = 6, 32, 16, 4, 2
    x = torch.randn(T, 2 * H, generator=g)[:, ::2]  # every other column: not contiguous
    w13 = (torch.randn(E, H, 2 * I, generator=g) / H**0.5).transpose(1, 2)  # [E, 2I, H] with stride 1 along 2I
    w2 = (torch.randn(E, I, H, generator=g) / I**0.5).transpose(1, 2)  # [E, H, I] with stride 1 along H
    ids, weights = _routing(T, E, K, g)
    assert not (x.is_contiguous() or w13.is_contiguous() or w2.is_contiguous())
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids),
                               moe_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,E,K", [(9, 1, 1), (70, 4, 4), (40, 64, 8)])
def test_moe_align_one_expert_many_programs_many_experts(T, E, K):
    # E = 1 (one-element scan); 280 pairs span two programs of the count/scatter kernels; 64 experts.
    g = torch.Generator().manual_seed(T + E)
    ids, _ = _routing(T, E, K, g)
    for block_m in (16, 32):
        got, want = moe_align_block_size(ids, E, block_m), moe_align_block_size_reference(ids, E, block_m)
        n = int(want[2])
        assert int(got[2]) == n and torch.equal(got[1], want[1])
        for b in range(n // block_m):
            rows = slice(b * block_m, (b + 1) * block_m)
            assert sorted(got[0][rows].tolist()) == sorted(want[0][rows].tolist())
        assert (got[0][n:] == ids.numel()).all()


def test_tuning_sweep_keeps_the_fastest_and_writes_what_get_config_reads(tmp_path, capsys):
    from marserve_kernels import tune
    configs = [{"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "num_warps": 4, "num_stages": 3}
               for m in (16, 32, 64)]

    def fake_ms(M, cfg):  # smaller row blocks win at few tokens, larger at many; 32 fails to launch at 1
        if M == 1 and cfg["BLOCK_SIZE_M"] == 32:
            raise RuntimeError("out of shared memory")
        return abs(cfg["BLOCK_SIZE_M"] - M) + 1.0

    best = tune.sweep(fake_ms, [1, 40, 512], configs)
    assert {M: cfg["BLOCK_SIZE_M"] for M, cfg in best.items()} == {"1": 16, "40": 32, "512": 64}
    tune.write_configs(best, tmp_path, 6, 48, "cpu", torch.bfloat16)
    assert get_config(6, 48, torch.bfloat16, 300, "cpu", config_dir=tmp_path)["BLOCK_SIZE_M"] == 64
    with pytest.raises(RuntimeError, match="out of shared memory"):
        tune.sweep(fake_ms, [1], configs[1:2])
    from marserve_kernels.fused_moe_config import check_config
    for cfg in tune.candidates():  # every candidate the real sweep times is one the loader accepts
        check_config(cfg)


def test_tuning_module_exits_2_without_a_gpu():
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tuning would run")
    r = subprocess.run([sys.executable, "-m", "marserve_kernels.tune", "--experts", "4", "--hidden", "8",
                        "--intermediate", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_cpu_installs_without_triton_still_work():
    import os
    import subprocess
    import sys
    code = """
import sys
sys.modules["triton"] = None  # as if Triton were not installed: importing it raises ImportError
import torch, marserve_kernels
from marserve_kernels.reference import moe_reference
x, w13, w2 = torch.randn(3, 16), torch.randn(4, 16, 16) / 4, torch.randn(4, 16, 8) / 3
ids, w = torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
torch.testing.assert_close(marserve_kernels.moe(x, w13, w2, w, ids), moe_reference(x, w13, w2, w, ids))
try:
    marserve_kernels.fused_moe(x, w13, w2, w, ids)
except RuntimeError as e:
    print("refused:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MARSERVE_MOE_BACKEND": ""})
    assert r.returncode == 0, r.stderr
    assert "refused: Triton is not installed" in r.stdout
