"""Routing alignment for the grouped expert GEMMs: (token, slot) pairs grouped by expert, padded to the GEMM's row block.

From topk_ids [T, K] (P = T*K pairs, pair p = token * K + slot):
- sorted_pair_ids [P_max]: the pairs of expert 0, padded with the sentinel P up to a multiple of
  block_m, then those of expert 1, ...; P_max = P + E * (block_m - 1) bounds every routing;
- block_expert_ids [P_max / block_m]: the expert whose pairs fill each row block (-1 past the end);
- num_padded [1]: how many entries of sorted_pair_ids are in use (a multiple of block_m).
So a GEMM program that takes row block b reads one expert's weights for all its rows. A pair whose
expert id is outside 0..E-1 (e.g. -1 for an expert another device owns) is left out: it lands in no
block and so adds nothing, and a bad id can never index memory out of bounds. The Triton
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
    in_range = (flat >= 0) & (flat < num_experts)
    flat = torch.where(in_range, flat, num_experts)  # out-of-range pairs sort last and are dropped below
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    sorted_ids = torch.full((p_max,), P, dtype=torch.int32, device=topk_ids.device)
    order = torch.argsort(flat, stable=True)[:int(counts.sum())]
    rank = torch.arange(len(order), device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    total = int(padded.sum())
    expert_ids = torch.full((p_max // block_m,), -1, dtype=torch.int32, device=topk_ids.device)
    expert_ids[:total // block_m] = torch.repeat_interleave(torch.arange(num_experts, device=flat.device,
                                                                         dtype=torch.int32), padded // block_m)
    return sorted_ids, expert_ids, torch.tensor([total], dtype=torch.int32, device=topk_ids.device)


if triton is not None:
    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, P, E, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(ids_ptr + offs, mask=offs < P, other=0)
        mask = (offs < P) & (e >= 0) & (e < E)  # out-of-range ids: not counted, never an address
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
    def _scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, P, E, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(ids_ptr + offs, mask=offs < P, other=0)
        mask = (offs < P) & (e >= 0) & (e < E)
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
    _count_kernel[grid](flat, counts, P, num_experts, BLOCK=BLOCK)
    _offsets_kernel[(1,)](counts, cursor, expert_ids, num_padded, num_experts, num_blocks, block_m=block_m,
                          BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=64)
    _scatter_kernel[grid](flat, cursor, sorted_ids, P, num_experts, BLOCK=BLOCK)
    return sorted_ids, expert_ids, num_padded
