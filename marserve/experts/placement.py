"""Which rank holds which expert under expert parallelism: `round_robin`, and `mar` (affinity-aware, balanced).

Legend: L=MoE layers (in layer order), E=experts per layer, N=ranks, K=experts per token, T=tokens,
S=MAR memory slots, H=hidden.

The token's rank. Attention is data-parallel in spirit: at the first MoE layer a token belongs to the rank
its position in the batch falls on (tokens split into N contiguous shares). After each MoE layer the token
moves with its top-1 expert (ExFlow, arXiv 2401.08383): the rank that computed its heaviest expert becomes its
rank for the next layer. So a (token, expert) assignment at layer l is local when the expert sits on the rank
of the token's top-1 expert at layer l-1. Why this definition: placement cannot change where the batch puts
a token at the first layer (any balanced placement keeps ~1/N local there), but it can put the experts that
tokens go on to next to the ones they come from, which is where routing has structure (MAR's chains).

The objective `mar` maximises is therefore the chain count sum_l sum_{a,b} chain[l][a,b] [rank_{l-1}(a) ==
rank_l(b)], plus a smaller weight on co-selection (experts chosen for the same token on one rank share one
message). Constraints: every rank holds ceil(E/N) or floor(E/N) experts of every layer (memory), and each
rank's usage-weighted load per layer is within `tolerance` (10%) of the mean, or as close as a balanced
partition of that layer's usage allows (with N=E each rank holds one expert, and the load is the usage).
Solved per layer by a greedy start (each expert to the rank its predecessors live on, while capacity and
load allow) and pairwise swaps that improve the objective and keep the constraints, sweeping the layers
until no swap helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COSELECT_WEIGHT = 0.5  # co-selection saves bytes (one message for two experts) but not locality: weigh it less
# How sharply memory similarity decides where an expert's tokens go next (from_mar). Chosen on the default
# model's held-out routing among 0.05 / 0.1 / 0.2 (correlation with measured chains 0.66 / 0.72 / 0.79).
MEMORY_TEMPERATURE = 0.2


@dataclass
class RoutingStats:
    """What placement needs to know about routing, per MoE layer.

    usage [L,E]: share of (token, expert) assignments per expert, each row sums to one.
    coselect [L,E,E]: share of tokens choosing both a and b (symmetric, zero diagonal).
    chain [L,E,E]: chain[l][a,b] = share of tokens whose top-1 expert at layer l-1 is a and that choose b at
        layer l (chain[0] is zero: the first layer has no predecessor).
    """

    usage: torch.Tensor
    coselect: torch.Tensor
    chain: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.usage.shape[0]

    @property
    def num_experts(self) -> int:
        return self.usage.shape[1]

    @classmethod
    def from_trace(cls, ids: list[torch.Tensor], num_experts: int) -> "RoutingStats":
        """ids: per MoE layer, the top-k ids [T,K] of the same T tokens (column 0 = top-1)."""
        L, E = len(ids), num_experts
        usage = torch.zeros(L, E, dtype=torch.float64)
        coselect = torch.zeros(L, E, E, dtype=torch.float64)
        chain = torch.zeros(L, E, E, dtype=torch.float64)
        for l, t in enumerate(ids):
            t = t.long()
            T, K = t.shape
            onehot = torch.zeros(T, E, dtype=torch.float64).scatter_(1, t, 1.0)  # [T,E]
            usage[l] = onehot.sum(0) / (T * K)
            co = onehot.T @ onehot / T
            co.fill_diagonal_(0)
            coselect[l] = co
            if l > 0:
                top1 = torch.zeros(T, E, dtype=torch.float64).scatter_(1, ids[l - 1][:, :1].long(), 1.0)
                chain[l] = top1.T @ onehot / T
        return cls(usage, coselect, chain)

    @classmethod
    def from_mar(cls, memory: torch.Tensor, usage: torch.Tensor) -> "RoutingStats":
        """Estimates from a MAR checkpoint alone (no text run): memory [L,E,S,H] unit prototypes, usage [L,E].

        A prototype is the direction of the router inputs its expert takes, so two experts whose memories
        point the same way take the same kind of token. Chains: the tokens of expert a at layer l-1 (usage
        share) spread over layer l's experts b by softmax_b(sim(a, b) / MEMORY_TEMPERATURE), with sim the best
        cosine between their slots; co-selection alike within one layer. (Routing the prototypes through the
        next layer's affinity instead, or through the gate too, agreed far less with measured chains on the
        default model: correlation 0.23-0.33 against 0.79 for this.)
        """
        u = usage.double() / usage.double().sum(-1, keepdim=True)
        mem = memory.double()
        L, E = u.shape
        chain = torch.zeros(L, E, E, dtype=torch.float64)
        coselect = torch.zeros(L, E, E, dtype=torch.float64)
        eye = torch.eye(E, dtype=torch.bool)
        for l in range(L):
            same = _memory_similarity(mem[l], mem[l]).masked_fill(eye, float("-inf"))
            co = torch.softmax(same / MEMORY_TEMPERATURE, -1) * u[l][:, None]
            coselect[l] = (co + co.T) / 2
            if l:
                chain[l] = torch.softmax(_memory_similarity(mem[l - 1], mem[l]) / MEMORY_TEMPERATURE, -1) \
                    * u[l - 1][:, None]
        return cls(u.clone(), coselect, chain)


def _memory_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E,E]: best cosine between any slot of expert i in `a` [E,S,H] and any slot of expert j in `b`."""
    return torch.einsum("ish,jth->ijst", a, b).flatten(2).amax(-1)


@dataclass
class Placement:
    """ranks [L,E]: the rank holding expert e of MoE layer l."""

    name: str
    num_ranks: int
    ranks: torch.Tensor

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Experts of MoE layer `layer` (index among MoE layers) held by `rank`, ascending."""
        return [int(e) for e in (self.ranks[layer] == rank).nonzero().flatten()]

    def loads(self, usage: torch.Tensor) -> torch.Tensor:
        """Usage-weighted load per rank [L,N] (each row sums to the layer's total usage)."""
        out = torch.zeros(self.ranks.shape[0], self.num_ranks, dtype=torch.float64)
        return out.scatter_add_(1, self.ranks.long(), usage.double())

    def imbalance(self, usage: torch.Tensor) -> float:
        """Largest |rank load - mean| / mean over layers and ranks (0.1 = within 10%)."""
        loads = self.loads(usage)
        mean = loads.mean(1, keepdim=True)
        return float(((loads - mean).abs() / mean).max())

    def to_dict(self) -> dict:
        return {"name": self.name, "num_ranks": self.num_ranks, "ranks": self.ranks.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls(d["name"], int(d["num_ranks"]), torch.tensor(d["ranks"], dtype=torch.int64))


def round_robin(num_layers: int, num_experts: int, num_ranks: int) -> Placement:
    """Expert e on rank e mod N in every layer (what an engine does knowing nothing of routing)."""
    _check(num_experts, num_ranks)
    ranks = (torch.arange(num_experts) % num_ranks).repeat(num_layers, 1)
    return Placement("round_robin", num_ranks, ranks)


def mar(stats: RoutingStats, num_ranks: int, tolerance: float = 0.1, max_sweeps: int = 20) -> Placement:
    """Affinity-aware balanced placement (see the module docstring for the objective and constraints)."""
    L, E, N = stats.num_layers, stats.num_experts, num_ranks
    _check(E, N)
    cap = _capacities(E, N)
    ranks = torch.zeros(L, E, dtype=torch.int64)
    limits = []
    for l in range(L):
        balanced = _balanced(stats.usage[l], cap)
        limit = max(tolerance, _deviation(stats.usage[l], balanced, N))
        limits.append(limit)
        greedy = _greedy(stats, l, ranks[l - 1] if l else None, cap, limit) if l else None
        ranks[l] = greedy if greedy is not None else balanced
    for _ in range(max_sweeps):
        improved = False
        for l in range(L):
            improved |= _improve_layer(stats, ranks, l, N, limits[l])
        if not improved:
            break
    return Placement("mar", N, ranks)


def objective(stats: RoutingStats, ranks: torch.Tensor) -> float:
    """Chain locality plus COSELECT_WEIGHT x co-selected pairs on one rank (what `mar` maximises)."""
    total = 0.0
    for l in range(stats.num_layers):
        same = (ranks[l][:, None] == ranks[l][None, :]).double()
        total += COSELECT_WEIGHT * float((stats.coselect[l] * same).sum()) / 2
        if l:
            total += float((stats.chain[l] * (ranks[l - 1][:, None] == ranks[l][None, :]).double()).sum())
    return total


def _check(num_experts: int, num_ranks: int) -> None:
    if num_ranks < 1 or num_ranks > num_experts:
        raise ValueError(f"expert parallelism over {num_ranks} ranks needs 1 <= ranks <= experts per layer "
                         f"({num_experts})")


def _capacities(E: int, N: int) -> torch.Tensor:
    """Experts per rank: E/N each, the first E mod N ranks one more."""
    return torch.tensor([E // N + (1 if r < E % N else 0) for r in range(N)])


def _deviation(usage: torch.Tensor, ranks: torch.Tensor, N: int) -> float:
    loads = torch.zeros(N, dtype=torch.float64).scatter_add_(0, ranks, usage.double())
    return float(((loads - loads.mean()).abs() / loads.mean()).max())


def _balanced(usage: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Longest-processing-time partition: heaviest expert first, onto the lightest rank with room."""
    N = cap.numel()
    ranks = torch.zeros(usage.numel(), dtype=torch.int64)
    load, count = [0.0] * N, [0] * N
    for e in usage.double().argsort(descending=True).tolist():
        r = min((r for r in range(N) if count[r] < cap[r]), key=lambda r: load[r])
        ranks[e] = r
        load[r] += float(usage[e])
        count[r] += 1
    return ranks


def _greedy(stats: RoutingStats, l: int, prev: torch.Tensor, cap: torch.Tensor, limit: float):
    """Each expert of layer l (most used first) to the rank where its predecessors live, within capacity and
    the load limit; None when the limit cannot be kept this way (the balanced start is used instead)."""
    N = cap.numel()
    usage = stats.usage[l].double()
    mean = float(usage.sum()) / N
    score = torch.zeros(stats.num_experts, N, dtype=torch.float64).index_add_(1, prev, stats.chain[l].T)  # [E,N]
    ranks = torch.full((stats.num_experts,), -1, dtype=torch.int64)
    load, count = [0.0] * N, [0] * N
    for e in usage.argsort(descending=True).tolist():
        fits = [r for r in range(N) if count[r] < cap[r] and load[r] + float(usage[e]) <= mean * (1 + limit)]
        if not fits:
            return None
        r = max(fits, key=lambda r: (float(score[e, r]), -load[r]))
        ranks[e] = r
        load[r] += float(usage[e])
        count[r] += 1
    return ranks if _deviation(usage, ranks, N) <= limit + 1e-9 else None


def _improve_layer(stats: RoutingStats, ranks: torch.Tensor, l: int, N: int, limit: float) -> bool:
    """Best-improvement swaps of two experts of layer l on different ranks, within the load limit."""
    improved = False
    usage = stats.usage[l].double()
    mean = float(usage.sum()) / N
    co = stats.coselect[l] * COSELECT_WEIGHT
    for _ in range(stats.num_experts ** 2):
        r = ranks[l]
        # S[b, q]: what expert b gains on rank q from its predecessors, successors and co-selected peers.
        S = co @ torch.nn.functional.one_hot(r, N).double()
        if l:
            S += torch.zeros(stats.num_experts, N, dtype=torch.float64).index_add_(1, ranks[l - 1], stats.chain[l].T)
        if l + 1 < stats.num_layers:
            S += torch.zeros(stats.num_experts, N, dtype=torch.float64).index_add_(1, ranks[l + 1], stats.chain[l + 1])
        own = S.gather(1, r[:, None])  # [E,1]
        at_other = S[:, r]  # [E,E]: S[b, rank of c]
        delta = at_other - own + at_other.T - own.T - 2 * co
        loads = torch.zeros(N, dtype=torch.float64).scatter_add_(0, r, usage)
        shift = usage[None, :] - usage[:, None]  # swapping b and c moves u_c - u_b onto b's rank
        new_b = loads[r][:, None] + shift
        new_c = loads[r][None, :] - shift
        ok = ((new_b - mean).abs() <= mean * limit + 1e-12) & ((new_c - mean).abs() <= mean * limit + 1e-12)
        ok &= r[:, None] != r[None, :]
        delta = torch.where(ok, delta, torch.full_like(delta, -1.0))
        best = int(delta.argmax())
        b, c = divmod(best, stats.num_experts)
        if float(delta[b, c]) <= 1e-12:
            break
        ranks[l, b], ranks[l, c] = int(r[c]), int(r[b])
        improved = True
    return improved
