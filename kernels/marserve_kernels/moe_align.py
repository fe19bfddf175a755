"""Routing alignment for the grouped expert GEMMs: (token, slot) pairs grouped by expert, padded to the GEMM's row block.

From topk_ids [T, K] (P = T*K pairs, pair p = token * K + slot):
- sorted_pair_ids [P_max]: the pairs of expert 0, padded with the sentinel P up to a multiple of
  block_m, then those of expert 1, ...; P_max = P + E * (block_m - 1) bounds every routing;
- block_expert_ids [P_max / block_m]: the expert whose pairs fill each row block (-1 past the end);
- num_padded [1]: how many entries of sorted_pair_ids are in use (a multiple of block_m).
So a GEMM program that takes row block b reads one expert's weights for all its rows. The Triton
version counts with atomics, so pairs of one expert may come in any order; the torch reference
keeps pair order. Legend: T tokens, K experts per token, P pairs, E experts.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs need not have Triton; the reference still works
    triton = None


def _sizes(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[int, int]:
    P = topk_ids.numel()
    p_max = P + num_experts * (block_m - 1)
    return P, -(-p_max // block_m) * block_m


def moe_align_block_size_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch; pairs of each expert in pair order."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    P, p_max = _sizes(topk_ids, num_experts, block_m)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    sorted_ids = torch.full((p_max,), P, dtype=torch.int32, device=topk_ids.device)
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(P, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    total = int(padded.sum())
    expert_ids = torch.full((p_max // block_m,), -1, dtype=torch.int32, device=topk_ids.device)
    expert_ids[:total // block_m] = torch.repeat_interleave(torch.arange(num_experts, device=flat.device,
                                                                         dtype=torch.int32), padded // block_m)
    return sorted_ids, expert_ids, torch.tensor([total], dtype=torch.int32, device=topk_ids.device)


if triton is not None:
    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, P, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < P
        e = tl.load(ids_ptr + offs, mask=mask, other=0)
        tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=mask)

    @triton.jit
    def _offsets_kernel(counts_ptr, cursor_ptr, expert_ids_ptr, num_padded_ptr, E, num_blocks,
                        block_m: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
        e = tl.arange(0, BLOCK_E)
        counts = tl.load(counts_ptr + e, mask=e < E, other=0)
        padded = (counts + block_m - 1) // block_m * block_m
        ends = tl.cumsum(padded, 0)  # [E] exclusive end of each expert's rows
        tl.store(cursor_ptr + e, ends - padded, mask=e < E)  # where each expert's next pair goes
        tl.store(num_padded_ptr, tl.sum(padded, 0))
        # Row block b belongs to the expert whose rows contain b * block_m: count the ends at or before it.
        for b0 in range(0, num_blocks, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            first_row = b * block_m
            owner = tl.sum(((ends[None, :] <= first_row[:, None]) & (e[None, :] < E)).to(tl.int32), 1)
            owner = tl.where(owner < E, owner, -1)
            tl.store(expert_ids_ptr + b, owner.to(tl.int32), mask=b < num_blocks)

    @triton.jit
    def _scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, P, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < P
        e = tl.load(ids_ptr + offs, mask=mask, other=0)
        slot = tl.atomic_add(cursor_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=mask)
        tl.store(sorted_ptr + slot, offs.to(tl.int32), mask=mask)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton: (sorted_pair_ids [P_max] int32, block_expert_ids [P_max / block_m] int32, num_padded [1] int32)."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use moe_align_block_size_reference")
    P, p_max = _sizes(topk_ids, num_experts, block_m)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int32).contiguous()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.full((p_max,), P, dtype=torch.int32, device=dev)
    num_blocks = p_max // block_m
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    BLOCK = 256
    grid = (max(1, triton.cdiv(P, BLOCK)),)
    _count_kernel[grid](flat, counts, P, BLOCK=BLOCK)
    _offsets_kernel[(1,)](counts, cursor, expert_ids, num_padded, num_experts, num_blocks, block_m=block_m,
                          BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=64)
    _scatter_kernel[grid](flat, cursor, sorted_ids, P, BLOCK=BLOCK)
    return sorted_ids, expert_ids, num_padded
