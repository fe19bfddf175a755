"""The CPU MoE path: few tokens per expert -> the native streaming kernel; many -> one GEMM pair per active expert.

Decode (a few (token, slot) pairs per touched expert) is memory-bound: cpu_moe_small.c reads each touched
expert's rows once and dots them with all of its pairs, near the machine's read bandwidth. Prefill (many
pairs per expert) is compute-bound: pairs are sorted by expert and each active expert runs two large
contiguous GEMMs through oneDNN (marserve_kernels.cpu_linear), with the activation done in place.
Opt-in, pack_experts() adds oneDNN-blocked copies of the expert weights for that GEMM path (~15% faster
many-token calls, twice the expert memory; the plain weights stay for the native kernel).
Legend: T=tokens, K=experts per token, P=T*K (token, slot) pairs, E=experts, H=hidden, I=expert intermediate.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from marserve_kernels import cpu_linear, cpu_moe_native, cpu_threads
from marserve_kernels.cpu_linear import linear

logger = logging.getLogger(__name__)

# The native kernel wins while experts see few pairs (memory-bound, or GEMMs too thin for oneDNN) or the
# whole call is small (per-expert GEMM overheads dominate). Measured on 2 threads: H1024 I2816 E32 top-2
# crosses over at ~40 pairs per expert (T=512: 62 vs 72 ms; T=1024: 114 vs 103 ms); the shipped model's
# shape (H256 I256 E8 top-2) at ~0.4 GFLOP per call (T=512).
# With bf16 weights oneDNN's GEMMs use the CPU's bf16 dot products (twice the fp32 FMA rate) while the native
# kernel widens to fp32, so they win earlier: H1024 bf16 crosses at ~12 (T=128: 18.5 vs 22.9 ms native/GEMM;
# T=256: 31.0 vs 27.1 ms).
NATIVE_MAX_PAIRS_PER_EXPERT = {torch.float32: 32, torch.bfloat16: 12}
NATIVE_MAX_FLOPS = 3e8
# Handing work to the worker threads costs ~0.1 ms; below this many FLOPs oneDNN's own threads do better.
WORKERS_MIN_FLOPS = 64e6


def _can_use_native(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    return (hidden.device.type == "cpu" and hidden.dtype == w13.dtype == w2.dtype
            and w13.is_contiguous() and w2.is_contiguous() and cpu_moe_native.available(w13.dtype))


def native_is_faster(tokens: int, top_k: int, experts: int, hidden: int, inter: int, dtype: torch.dtype) -> bool:
    """Whether the native few-token kernel beats the per-expert GEMMs for this call (the crossovers above);
    the CPU decode-layer kernel, which runs the experts natively, asks the same question."""
    flops = 6 * tokens * top_k * hidden * inter
    return tokens * top_k <= NATIVE_MAX_PAIRS_PER_EXPERT.get(dtype, 0) * experts or flops <= NATIVE_MAX_FLOPS


def takes_native(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tokens: int, top_k: int,
                 experts: int) -> bool:
    """Whether grouped_moe runs a call of `tokens` tokens routed over `experts` experts (shaped like w13/w2) in
    the native kernel. A caller that splits one call's pairs across processes (marserve/experts/parallel.py)
    asks it for the whole call, so that every part takes the arithmetic the whole call would."""
    return (native_is_faster(tokens, top_k, experts, hidden.shape[1], w13.shape[1] // 2, w13.dtype)
            and _can_use_native(hidden, w13, w2))


def grouped_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, K] -> [T, H]."""
    T, K = topk_ids.shape
    if T == 0:
        return torch.zeros_like(hidden)
    if takes_native(hidden, w13, w2, T, K, w13.shape[0]):
        return cpu_moe_native.small_moe(hidden, w13, w2, topk_weights, topk_ids)
    return gemm_moe(hidden, w13, w2, topk_weights, topk_ids)


# (w13 pointer, w2 pointer) -> (w13, w2, their versions, per-expert packed w13, per-expert packed w2).
# Holding w13/w2 keeps their memory from being reused by other tensors while the entry exists.
_packed: dict[tuple[int, int], tuple] = {}


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> int:
    """Opt-in: keep oneDNN-blocked copies of every expert's weights for many-token calls; returns the bytes added.

    GEMMs on blocked weights skip oneDNN's per-call repacking: measured ~99% vs ~86% of the fp32 peak at
    128 rows per expert. It doubles the expert memory (the plain tensors stay: the few-token kernel reads
    them), so it is never done implicitly. Modifying w13/w2 in place afterwards drops the copies.
    """
    if not (w13.device.type == "cpu" and cpu_linear.can_pack(w13[0]) and cpu_linear.can_pack(w2[0])):
        raise ValueError(f"cannot pack {w13.dtype} expert weights on {w13.device} with this torch build")
    p13 = [cpu_linear.pack(w13[e]) for e in range(w13.shape[0])]
    p2 = [cpu_linear.pack(w2[e]) for e in range(w2.shape[0])]
    _packed[(w13.data_ptr(), w2.data_ptr())] = (w13, w2, w13._version, w2._version, p13, p2)
    added = (w13.numel() + w2.numel()) * w13.element_size()
    logger.info("packed %d experts for the CPU GEMM path: +%.1f MB", w13.shape[0], added / 1e6)
    return added


def use_packed_experts(enabled: bool) -> None:
    """Switch the use of pack_experts() copies off or on (they stay in memory): for side-by-side timing."""
    global _use_packed
    _use_packed = enabled


_use_packed = True


def unpack_experts(w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Drop the blocked copies pack_experts() made for these weights (no-op if none)."""
    _packed.pop((w13.data_ptr(), w2.data_ptr()), None)


def _packed_for(w13: torch.Tensor, w2: torch.Tensor):
    entry = _packed.get((w13.data_ptr(), w2.data_ptr()))
    if entry is None:
        return None
    p_w13, p_w2, v13, v2, p13, p2 = entry
    if p_w13.shape != w13.shape or p_w2.shape != w2.shape or (w13._version, w2._version) != (v13, v2):
        unpack_experts(w13, w2)  # stale: the weights changed since they were packed
        return None
    return p13, p2


def gemm_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
             topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Pairs sorted by expert, one gate/up GEMM and one down GEMM per active expert; any dtype/device.

    On CPU with several threads, experts run side by side on single-threaded workers (cpu_threads.py).
    A negative id leaves its slot out (another process runs that expert) and adds zero: every expert gets
    the rows, in the order, it gets in a call without such slots.
    """
    T, K = topk_ids.shape
    E, inter = w13.shape[0], w13.shape[1] // 2
    flat_ids = topk_ids.reshape(-1)  # [P]
    left_out = bool((flat_ids < 0).any())
    if left_out:
        flat_ids = flat_ids.masked_fill(flat_ids < 0, E)  # sorted after every expert, run by none
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()[:E]
    token_of = order // K  # [P] source token of each sorted pair
    pair_weight = topk_weights.reshape(-1).to(hidden.dtype)  # [P] in (token, slot) order
    y = (hidden.new_zeros if left_out else hidden.new_empty)(T * K, hidden.shape[1])  # [P, H] (token, slot) order
    jobs, start = [], 0  # (expert, first sorted pair, pairs)
    for e, n in enumerate(counts):
        if n:
            jobs.append((e, start, n))
        start += n

    packed = _packed_for(w13, w2) if hidden.device.type == "cpu" and _use_packed else None
    w13_of, w2_of = packed if packed is not None and packed[0][0].dtype == hidden.dtype else (w13, w2)

    def run_experts(part):
        # Gather, GEMMs, activation, routing weight and scatter all per expert, so they run on the workers too.
        for e, first, n in part:
            pairs = order[first:first + n]  # [n] positions in (token, slot) order
            gate_up = linear(hidden.index_select(0, token_of[first:first + n]), w13_of[e])  # [n, 2I]
            gate = F.silu(gate_up[:, :inter], inplace=True)  # in place: no [n, I] temporary
            act = gate.mul_(gate_up[:, inter:])  # [n, I] (strided view into gate_up)
            out = linear(act, w2_of[e])  # [n, H]
            out.mul_(pair_weight.index_select(0, pairs).unsqueeze(1))  # routing weight after the activation
            y.index_copy_(0, pairs, out)

    workers = min(torch.get_num_threads(), len(jobs))
    flops = 6 * T * K * hidden.shape[1] * inter
    if (hidden.device.type == "cpu" and workers > 1 and flops >= WORKERS_MIN_FLOPS
            and cpu_threads.can_run_single_threaded_workers()):
        cpu_threads.run_parallel(run_experts, _balance(jobs, workers))
    else:
        run_experts(jobs)
    return _sum_slots(y.view(T, K, -1))


def _sum_slots(y: torch.Tensor) -> torch.Tensor:
    """[T, K, H] -> [T, H]: K-1 elementwise adds, ~5x faster here than sum(1) over the small middle dim."""
    out = torch.add(y[:, 0], y[:, 1]) if y.shape[1] > 1 else y[:, 0].clone()
    for k in range(2, y.shape[1]):
        out.add_(y[:, k])
    return out


def _balance(jobs: list[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """Split (expert, first, rows) jobs into `parts` lists of about equal rows: largest first, to the lightest."""
    out, load = [[] for _ in range(parts)], [0] * parts
    for job in sorted(jobs, key=lambda j: -j[2]):
        i = load.index(min(load))
        out[i].append(job)
        load[i] += job[2]
    return out
