"""Pure functions that score recorded routing: load balance, consistency, locality, LRU hit rate, specialisation, prediction.

Shape legend: T=tokens, E=experts, K=active per token. `ids` are top-k expert ids [T,K] of one layer,
in token order; `seq_ids` [T] says which sequence each token belongs to (locality never crosses sequences).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, defaultdict

import torch


def expert_load(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of routed slots per expert [E], summing to 1."""
    counts = torch.bincount(ids.flatten(), minlength=num_experts).double()
    return counts / counts.sum().clamp_min(1)


def coefficient_of_variation(load: torch.Tensor) -> float:
    """std/mean of the per-expert load: 0 = perfectly balanced."""
    return float(load.std(unbiased=False) / load.mean()) if load.mean() > 0 else 0.0


def routing_consistency(token_ids: torch.Tensor, ids: torch.Tensor, min_count: int = 5) -> float:
    """How often a token type goes to its own K favourite experts, over tokens seen >= min_count times.

    Per token type: slots landing on its K most frequent experts / (K * occurrences); averaged weighted by
    occurrences. 1.0 = every occurrence of a token type picks the same experts; K/E-ish = unrelated.
    """
    k = ids.shape[1]
    per_type = defaultdict(Counter)
    for tok, row in zip(token_ids.tolist(), ids.tolist()):
        per_type[tok].update(row)
    hits = total = 0
    for counter in per_type.values():
        n = sum(counter.values()) // k
        if n < min_count:
            continue
        hits += sum(c for _, c in counter.most_common(k))
        total += n * k
    return hits / total if total else float("nan")


def next_token_reuse(ids: torch.Tensor, seq_ids: torch.Tensor) -> float:
    """SRP-style locality: mean share of a token's K experts that the previous token (same sequence) also used."""
    rows = ids.tolist()
    seqs = seq_ids.tolist()
    k = ids.shape[1]
    shared = n = 0
    for t in range(1, len(rows)):
        if seqs[t] != seqs[t - 1]:
            continue
        shared += len(set(rows[t]) & set(rows[t - 1]))
        n += k
    return shared / n if n else float("nan")


def lru_hit_rate(ids: torch.Tensor, seq_ids: torch.Tensor, capacity: int) -> float:
    """Hit rate of a per-layer LRU expert cache of `capacity` experts, emptied at each new sequence."""
    if capacity <= 0:
        return 0.0
    hits = lookups = 0
    cache: OrderedDict[int, None] = OrderedDict()
    prev_seq = None
    for row, seq in zip(ids.tolist(), seq_ids.tolist()):
        if seq != prev_seq:
            cache.clear()
            prev_seq = seq
        for e in row:
            lookups += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / lookups if lookups else float("nan")


def domain_expert_mutual_information(ids_by_domain: dict[str, torch.Tensor], num_experts: int) -> tuple[float, float]:
    """(I(domain; expert) in bits over routed slots, the same divided by H(domain) so 1.0 = experts name the domain)."""
    joint = torch.stack([torch.bincount(ids.flatten(), minlength=num_experts).double()
                         for ids in ids_by_domain.values()])                      # [D,E]
    p = joint / joint.sum()
    pd, pe = p.sum(dim=1, keepdim=True), p.sum(dim=0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * torch.log2(p[nz] / (pd @ pe)[nz])).sum())
    hd = float(-(pd[pd > 0] * torch.log2(pd[pd > 0])).sum())
    return mi, (mi / hd if hd > 0 else float("nan"))


def prediction_precision(pred_scores: torch.Tensor, actual_ids: torch.Tensor, k: int) -> float:
    """|top-k(pred) ∩ actual| / k averaged over tokens; with k = K it is precision = recall at K."""
    pred = torch.topk(pred_scores, k, dim=-1).indices.tolist()
    act = actual_ids.tolist()
    hits = sum(len(set(p) & set(a)) for p, a in zip(pred, act))
    return hits / (k * len(act)) if act else float("nan")


def prediction_recall(pred_scores: torch.Tensor, actual_ids: torch.Tensor, k: int) -> float:
    """Share of the actual K experts found among the top-k predicted (k may exceed K: a prefetch budget)."""
    pred = torch.topk(pred_scores, k, dim=-1).indices.tolist()
    act = actual_ids.tolist()
    hits = sum(len(set(p) & set(a)) for p, a in zip(pred, act))
    return hits / (actual_ids.shape[1] * len(act)) if act else float("nan")


def entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum()) if len(p) else 0.0


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")
