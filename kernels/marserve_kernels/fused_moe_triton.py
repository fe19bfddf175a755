"""The fused Triton MoE: two grouped GEMMs over the pairs aligned by expert (moe_align.py).

1. gate/up: for each row block (one expert's pairs) and column block of I, the gate and up products
   accumulate side by side and the epilogue writes silu(gate) * up: the [P, 2I] gate/up tensor is
   never written to memory (vLLM writes it and runs the activation as a second kernel).
2. down: the [P, I] activations times w2, scaled by each pair's routing weight in the epilogue and
   atomically added into the token's fp32 output row, so the top-k sum happens in the kernel.
Weights: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]; fp32, fp16 or bf16 activations,
fp32 accumulation. Legend: T tokens, K experts per token, P = T*K pairs, E experts, H hidden,
I expert intermediate; BM/BN/BK the block sizes (fused_moe_config.py).
"""

from __future__ import annotations

import os

import torch

from marserve_kernels.fused_moe_config import check_config, get_config
from marserve_kernels.moe_align import moe_align_block_size

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    @triton.jit
    def _gate_up_kernel(x_ptr, w13_ptr, act_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, weights_ptr,
                        P, H, I, K_top,
                        stride_xt, stride_we, stride_wn, stride_wk, stride_ap,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m * BM >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = pid_m * BM + tl.arange(0, BM)
        pair = tl.load(sorted_ptr + rows)  # [BM] pair ids; P marks padding
        valid = pair < P
        # int64 before the row offsets: pair * I passes 2^31 in long prefills (64k tokens x top-8 x I=14336).
        pair = pair.to(tl.int64)
        token = pair // K_top
        cols = pid_n * BN + tl.arange(0, BN)  # columns of I
        col_ok = cols < I
        acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        w_base = w13_ptr + expert * stride_we
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < H
            x = tl.load(x_ptr + token[:, None] * stride_xt + ks[None, :], mask=valid[:, None] & k_ok[None, :],
                        other=0.0)  # [BM, BK]
            wg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN] gate rows
            wu = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None] * stride_wk,
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN] up rows
            if DOT_FP32:  # "ieee": fp32 operands are not rounded to tf32 on the tensor cores
                x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_gate = tl.dot(x, wg, acc_gate, input_precision="ieee")
                acc_up = tl.dot(x, wu, acc_up, input_precision="ieee")
            else:
                acc_gate = tl.dot(x, wg, acc_gate)
                acc_up = tl.dot(x, wu, acc_up)
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, in fp32
        tl.store(act_ptr + pair[:, None] * stride_ap + cols[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(act_ptr, w2_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, weights_ptr,
                     P, H, I, K_top,
                     stride_ap, stride_we, stride_wn, stride_wk, stride_ot,
                     APPLY_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     DOT_FP32: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m * BM >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = pid_m * BM + tl.arange(0, BM)
        pair = tl.load(sorted_ptr + rows)
        valid = pair < P
        pair = pair.to(tl.int64)  # as in _gate_up_kernel: row offsets may pass 2^31
        token = pair // K_top
        cols = pid_n * BN + tl.arange(0, BN)  # columns of H
        col_ok = cols < H
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        w_base = w2_ptr + expert * stride_we
        for k0 in range(0, I, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < I
            a = tl.load(act_ptr + pair[:, None] * stride_ap + ks[None, :], mask=valid[:, None] & k_ok[None, :],
                        other=0.0)  # [BM, BK]
            w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN]
            if DOT_FP32:
                a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        if APPLY_WEIGHT:
            acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        # The K pairs of a token land on the same output row: add atomically (fp32 buffer).
        tl.atomic_add(out_ptr + token[:, None] * stride_ot + cols[None, :], acc,
                      mask=valid[:, None] & col_ok[None, :])


def _check_inputs(hidden, w13, w2, topk_weights, topk_ids) -> None:
    """Shapes and dtypes the kernels assume; a mismatch would otherwise read out of bounds or fail to compile."""
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(hidden.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    T, H = hidden.shape
    E, two_i, w13_h = w13.shape
    if w13_h != H or two_i % 2:
        raise ValueError(f"w13 has shape {tuple(w13.shape)}: expected [E, 2I, {H}] (gate rows, then as many up rows)")
    if tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}, expected {(E, H, two_i // 2)} for w13 {tuple(w13.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both "
                         f"be [T={T}, K]")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fused_moe takes fp32, fp16 or bf16 activations, not {hidden.dtype}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but w13/w2 are {w13.dtype}/{w2.dtype}: cast the weights "
                         f"(or the activations) to one dtype")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, not {topk_ids.dtype}")


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, apply_router_weight_on_input: bool = False,
              config: dict | None = None) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/ids [T, K] -> [T, H] in hidden's dtype.

    apply_router_weight_on_input: scale each pair's input by its routing weight instead of its output
    (needs K = 1, as the architectures that do this use). A pair whose expert id is outside 0..E-1
    (e.g. -1) adds nothing; checking the ids on the host would cost a device sync per call."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use marserve_kernels.moe")
    _check_inputs(hidden, w13, w2, topk_weights, topk_ids)
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    if T == 0:
        return out.to(hidden.dtype)
    if config is not None:
        cfg = check_config(config, "fused_moe(config=...)")
    else:
        cfg = get_config(E, I, hidden.dtype, T, hidden.device)
    BM, BN, BK = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    launch = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    # fp32 activations get fp32 products (tl.dot would round them to tf32 on a GPU). Triton's CPU
    # interpreter computes bf16 dots wrongly (garbage, measured in tests), so it upcasts bf16 too;
    # on a GPU bf16 and fp16 tiles go to the tensor cores as they are.
    dot_fp32 = hidden.dtype == torch.float32 or (
        hidden.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    x = hidden.contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    if apply_router_weight_on_input:
        # The weight scales the expert's input (llama4-style routing), so both products see it; the
        # down kernel then adds the outputs unscaled. One expert per token, as such models route.
        if K != 1:
            raise ValueError("apply_router_weight_on_input needs one expert per token (top-k = 1)")
        x = (x.float() * weights[:, None]).to(hidden.dtype)
    sorted_ids, block_experts, num_padded = moe_align_block_size(topk_ids, E, BM)
    P = topk_ids.numel()
    act = torch.empty(P, I, dtype=hidden.dtype, device=hidden.device)  # [P, I], pair order
    # The kernels take the weights' strides, so a strided view (e.g. a transposed checkpoint tensor) is
    # read in place: .contiguous() would copy every expert's weights on every call.
    w13c, w2c = w13, w2
    num_blocks = sorted_ids.numel() // BM
    _gate_up_kernel[(num_blocks, triton.cdiv(I, BN))](
        x, w13c, act, sorted_ids, block_experts, num_padded, weights, P, H, I, K,
        x.stride(0), w13c.stride(0), w13c.stride(1), w13c.stride(2), act.stride(0),
        BM=BM, BN=BN, BK=BK, DOT_FP32=dot_fp32, **launch)
    _down_kernel[(num_blocks, triton.cdiv(H, BN))](
        act, w2c, out, sorted_ids, block_experts, num_padded, weights, P, H, I, K,
        act.stride(0), w2c.stride(0), w2c.stride(1), w2c.stride(2), out.stride(0),
        APPLY_WEIGHT=not apply_router_weight_on_input, BM=BM, BN=BN, BK=BK, DOT_FP32=dot_fp32, **launch)
    return out.to(hidden.dtype)
