"""Expert parallelism behind ExpertProvider: each rank keeps its share of every MoE layer's experts, and a
block's tokens go to the ranks holding their experts and come back combined (torch.distributed).

Legend: T=tokens of the pass, H=hidden, K=experts per token, N=ranks, E'=experts held here, R=rows received.

Every rank runs the same forward pass (dense weights and attention replicated; rank 0 broadcasts each
step's inputs, marserve/engine/distributed.py), so all ranks see the same router decisions. Each token has
one owning rank per layer (the token's rank of marserve/experts/placement.py: batch position at the first
MoE layer, then the rank of its top-1 expert at the previous one). The owner sends the token's hidden
vector once to every rank holding some of its experts ("dispatch", one all_to_all_single), those ranks run
their experts and send back one weighted partial sum per token ("combine", a second all_to_all_single), and
the owner adds the partials. Because attention is replicated here, the owners' rows are then summed into
every rank (all_reduce of disjoint rows, exact); a runtime with data-parallel attention would skip that.
`transport="gather"` is the fallback measured against it: the owners' rows are gathered to every rank,
each rank runs its experts on every token routed to them, and one all_reduce sums the partials.
The same code runs on NCCL (tensors on the GPU); only gloo on CPU is tested here.

Exactness against one process: a rank runs its experts on the rows it got in the batch's token order (each
expert sees the same pairs in the same order as in one process, so the native kernel groups and computes
them alike) and with the kernel path one process would pick for the whole batch; its partial sums leave it
in float32 (what the native kernel accumulates in) and are rounded to the model's dtype once, after they
are added. With two experts per token the result is then one process's bits (fp32 addition of two terms is
commutative); with more, the partials are added in rank order where one process adds expert after expert
(fp32 reassociation before the one rounding). docs/expert_parallel.md has the details and the limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from marserve.experts.placement import Placement
from marserve.experts.provider import ExpertProvider, ExpertWeights

TRANSPORTS = ("all_to_all", "gather")


@dataclass
class ExpertParallelGroup:
    """What the providers of one model share: the process group, the placement and the pass's token ranks."""

    rank: int
    world_size: int
    placement: Placement
    group: object = None  # torch.distributed process group of the expert collectives (None = the default)
    transport: str = "all_to_all"
    owners: torch.Tensor | None = None  # [T] the token's rank at the next MoE layer
    bytes_sent: int = 0  # this rank's dispatch + combine payload to other ranks (self excluded)
    bytes_replicated: int = 0  # this rank's share of the replication all_reduce (all_reduce input bytes)
    tokens: int = 0  # tokens through the first MoE layer (per-token figures divide by it)
    # Whole-group figures, the same on every rank (routing is replicated, so each rank can count them all):
    group_bytes_sent: int = 0  # dispatch + combine payload between different ranks, all ranks together
    assignments: int = 0  # (token, expert) pairs routed
    local_assignments: int = 0  # of which the expert sat on the token's rank
    timeout: timedelta | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r}: choose one of {', '.join(TRANSPORTS)}")


class ParallelExperts(ExpertProvider):
    """This rank's experts of one MoE layer, stacked like ResidentExperts, and the all_to_all that reaches
    the others."""

    def __init__(self, layer_idx: int, moe_index: int, num_experts: int, hidden_size: int,
                 intermediate_size: int, group: ExpertParallelGroup, dtype=None, device=None):
        super().__init__(layer_idx, num_experts, hidden_size, intermediate_size)
        self.moe_index = moe_index  # position among the MoE layers (the placement's row)
        self.ep = group
        # Plain tensors, not buffers: not checkpoint entries, and real even while the model is built on meta.
        ranks = group.placement.ranks[moe_index].to("cpu", copy=True)
        held = [int(e) for e in (ranks == group.rank).nonzero().flatten()]
        self.expert_rank = ranks  # [E] rank of each expert
        self.slot = torch.full((num_experts,), -1, dtype=torch.int64, device="cpu")  # [E] row here, -1 elsewhere
        self.slot[held] = torch.arange(len(held), device="cpu")
        E, H, I = len(held), hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device=device))

    def local_slot(self, expert: int) -> int | None:
        s = int(self.slot[expert])
        return s if s >= 0 else None

    def fetch(self, topk_ids: torch.Tensor) -> ExpertWeights:
        """Only the experts held here: ids of other ranks' experts point at row 0 (callers zero their weight)."""
        slots = self.slot[topk_ids]
        self.record_lookups(int((slots >= 0).sum()))
        return ExpertWeights(self.w13, self.w2, slots.clamp(min=0))

    def compute(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        ep = self.ep
        T, N, me = x.shape[0], ep.world_size, ep.rank
        if self.slot.device != x.device:  # the lookup tables follow the weights' device (once)
            self.expert_rank, self.slot = self.expert_rank.to(x.device), self.slot.to(x.device)
        if self.moe_index == 0 or ep.owners is None or ep.owners.numel() != T:
            ep.owners = torch.arange(T, device=x.device) * N // max(T, 1)  # batch position
            ep.tokens += T
        owners = ep.owners
        ep.owners = self.expert_rank[topk_ids[:, 0]]  # the token moves with its top-1 expert
        self._count(x, topk_ids, owners)
        if ep.transport == "gather":
            return self._gathered(x, topk_weights, topk_ids, owners)
        # Dispatch: for each destination d, my tokens with an expert on d (each token once per rank).
        on_rank = torch.zeros(T, N, dtype=torch.bool, device=x.device)
        on_rank.scatter_(1, self.expert_rank[topk_ids], True)
        on_rank &= (owners == me)[:, None]
        send_idx = [on_rank[:, d].nonzero().flatten() for d in range(N)]
        send_counts = [int(i.numel()) for i in send_idx]
        order = torch.cat(send_idx)  # [S] token of each sent row, grouped by destination
        recv_counts = self._exchange_counts(send_counts, x.device)
        # [S, 2K+1]: ids, weights and the token's batch position (all exact in f32)
        routing = torch.cat([topk_ids[order].float(), topk_weights[order].float(), order[:, None].float()], 1)
        x_recv = self._all_to_all(x[order], recv_counts, send_counts)  # [R,H]
        r_recv = self._all_to_all(routing, recv_counts, send_counts)  # [R,2K+1]
        K = topk_ids.shape[1]
        batch_order = r_recv[:, 2 * K].argsort()  # [R] received rows in the batch's token order
        partial = torch.empty(x_recv.shape, dtype=torch.float32, device=x.device)  # [R,H]
        partial[batch_order] = self._run_local(x_recv[batch_order], r_recv[batch_order, K:2 * K].to(x.dtype),
                                               r_recv[batch_order, :K].long(), T)
        back = self._all_to_all(partial, send_counts, recv_counts)  # [S,H] float32 partial sums for my tokens
        row_out, row_back = x.shape[1] * x.element_size() + routing.shape[1] * 4, x.shape[1] * back.element_size()
        ep.bytes_sent += ((sum(send_counts) - send_counts[me]) * row_out
                          + (sum(recv_counts) - recv_counts[me]) * row_back)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, order, back)
        return self._replicate(out).to(x.dtype)  # the one rounding to the model's dtype

    def _count(self, x: torch.Tensor, topk_ids: torch.Tensor, owners: torch.Tensor) -> None:
        ep, K = self.ep, topk_ids.shape[1]
        expert_ranks = self.expert_rank[topk_ids]  # [T,K]
        ep.assignments += expert_ranks.numel()
        ep.local_assignments += int((expert_ranks == owners[:, None]).sum())
        other = torch.zeros(x.shape[0], ep.world_size, dtype=torch.bool, device=x.device)
        other.scatter_(1, expert_ranks, True).scatter_(1, owners[:, None], False)
        if ep.transport == "all_to_all":  # (the gather fallback moves whole batches instead: bytes_replicated)
            messages = int(other.sum())  # (token, other rank) pairs: one row out, one float32 partial back
            ep.group_bytes_sent += messages * (x.shape[1] * (x.element_size() + 4) + (2 * K + 1) * 4)

    def _gathered(self, x, topk_weights, topk_ids, owners) -> torch.Tensor:
        """Fallback: every rank gets every token (the owners' rows summed), runs its experts, all_reduce."""
        mine = (owners == self.ep.rank)[:, None]
        x_all = self._replicate(torch.where(mine, x, torch.zeros_like(x)))
        rows = (self.slot[topk_ids] >= 0).any(1).nonzero().flatten()  # tokens with an expert here, in order
        partial = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if rows.numel():
            partial[rows] = self._run_local(x_all[rows], topk_weights[rows], topk_ids[rows], x.shape[0])
        return self._replicate(partial).to(x.dtype)  # the one rounding to the model's dtype

    def _run_local(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, batch: int) -> torch.Tensor:
        """Float32 weighted sum over the experts of each row held here: x [R,H] (rows in the batch's token
        order), weights/ids [R,K] -> [R,H]. The kernel path is the one one process takes for the whole batch of
        `batch` tokens over all E experts, and other ranks' slots are left out (id -1), so each expert here
        runs the pairs one process gives it, in its order. The native kernel's fp32 sums come back unrounded;
        the GEMM path rounds per expert and per slot added, as in one process."""
        import marserve_kernels
        from marserve_kernels import cpu_moe, cpu_moe_native
        if x.shape[0] == 0:
            return x.new_zeros(x.shape, dtype=torch.float32)
        slots = self.slot[ids]  # [R,K] row here, -1 on other ranks
        path = marserve_kernels.moe_path(x, self.w13, self.w2, batch, ids.shape[1], self.num_experts)
        if path == "native":
            self.record_lookups(int((slots >= 0).sum()))
            return cpu_moe_native.small_moe(x.float(), self.w13, self.w2, weights, slots)
        if path == "gemm":
            self.record_lookups(int((slots >= 0).sum()))
            return cpu_moe.gemm_moe(x, self.w13, self.w2, weights, slots).float()
        ew = self.fetch(ids)  # other devices: other ranks' slots point at row 0 and weigh zero
        weights = torch.where(slots >= 0, weights, torch.zeros_like(weights))
        return marserve_kernels.moe(x, ew.w13, ew.w2, weights, ew.topk_ids).float()

    def _exchange_counts(self, send_counts: list[int], device) -> list[int]:
        recv = torch.empty(self.ep.world_size, dtype=torch.int64, device=device)
        dist.all_to_all_single(recv, torch.tensor(send_counts, dtype=torch.int64, device=device),
                               group=self.ep.group)
        return recv.tolist()

    def _all_to_all(self, t: torch.Tensor, recv_counts: list[int], send_counts: list[int]) -> torch.Tensor:
        out = t.new_empty((sum(recv_counts),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=self.ep.group)
        return out

    def _replicate(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's (disjoint) rows, on every rank."""
        if rows.dtype == torch.bfloat16 and rows.device.type == "cpu":
            # gloo sums bf16 too, but through float: send the float copy so the sum of one value + zeros is exact
            summed = rows.float()
            dist.all_reduce(summed, group=self.ep.group)
            self.ep.bytes_replicated += summed.numel() * 4
            return summed.to(rows.dtype)
        dist.all_reduce(rows, group=self.ep.group)
        self.ep.bytes_replicated += rows.numel() * rows.element_size()
        return rows

    def resident(self):
        return None  # not every expert is here: the fused whole-stack CPU decode kernel must not run


def shard_experts(model, group: ExpertParallelGroup) -> None:
    """Swap every MoE block's provider for this rank's ParallelExperts (on the meta model, before loading)."""
    for i, block in enumerate(model.moe_blocks()):
        old = block.experts
        block.experts = ParallelExperts(old.layer_idx, i, old.num_experts, old.hidden_size, old.intermediate_size,
                                        group, dtype=old.w13.dtype, device=old.w13.device)
