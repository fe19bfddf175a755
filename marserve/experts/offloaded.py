"""Expert offloading for a model: the budget in expert slots (and its minimum), the ExpertProvider of each MoE
layer backed by the shared ExpertStore, and the two steps the loader takes (`plan` before reading weights, so
expert tensors are never read into the model; `Offload.start` after, once the MAR usage is loaded).

Legend: T=tokens, K=experts per token, E=experts per layer, L=MoE layers, I=expert intermediate, H=hidden.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from marserve import hugepages
from marserve.errors import ConfigError
from marserve.experts.checkpoint_index import CheckpointIndex
from marserve.experts.policies import make_policy
from marserve.experts.preferences import load_preferences
from marserve.experts.provider import ExpertProvider, ExpertWeights
from marserve.experts.store import ExpertStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How many expert slots the fast tier gets, against the minimum and the total."""

    num_slots: int
    min_slots: int
    total: int  # experts of all MoE layers
    expert_bytes: int  # one expert in the compute dtype
    top_k: int
    num_layers: int  # MoE layers
    num_experts: int  # per layer

    @property
    def offloads(self) -> bool:
        return self.num_slots < self.total


def asks_for_offload(expert_cache: float = 1.0, expert_cache_gb: float | None = None) -> bool:
    """Whether the knobs ask for a budget below all experts (the one spelling of it; whether a budget really
    offloads is `Budget.offloads`: a size in GB may still buy every slot)."""
    return expert_cache < 1.0 or expert_cache_gb is not None


def budget_for(config, dtype: torch.dtype, expert_cache: float = 1.0, expert_cache_gb: float | None = None) -> Budget:
    """The slots a budget buys (a share of all experts, or GB of fast memory in the compute dtype); ConfigError,
    naming the minimum, when it is below one decode step's active experts (K x L) or one layer's experts (E): a
    step must be able to hold what it computes with at once."""
    E, K, H, I = config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
    L = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    expert_bytes = 3 * I * H * torch.empty((), dtype=dtype).element_size()
    total = E * L
    if expert_cache_gb is not None:
        slots, asked = min(total, int(expert_cache_gb * 2**30 // expert_bytes)), f"expert_cache_gb={expert_cache_gb}"
    else:
        slots, asked = min(total, int(expert_cache * total + 1e-9)), f"expert_cache={expert_cache}"
    minimum = min(total, max(K * L, E))
    budget = Budget(slots, minimum, total, expert_bytes, K, L, E)
    if slots < minimum:
        raise ConfigError(
            f"{asked} holds {slots} of the model's {total} experts; the minimum is {minimum} "
            f"(expert_cache={minimum / total:.4g}, expert_cache_gb={minimum * expert_bytes / 2**30:.4g}): one decode "
            f"step's {K} experts x {L} MoE layers, and at least one layer's {E}")
    return budget


class OffloadedExperts(ExpertProvider):
    """One MoE layer's experts, served from the shared store's slot pool: fetch() returns the whole pool with the
    routing ids remapped to slots (the MoE kernels read only the rows named)."""

    REMAP_IN_PYTHON = 64  # up to this many routing ids, remapped through a list (docs/offload.md, "Cost")

    def __init__(self, store: ExpertStore, layer_idx: int, num_experts: int, hidden_size: int,
                 intermediate_size: int):
        super().__init__(layer_idx, num_experts, hidden_size, intermediate_size)
        self.store = store
        self.stats = store.stats[layer_idx]  # the store counts; the provider shows them

    def fetch(self, topk_ids: torch.Tensor) -> ExpertWeights:
        ids = topk_ids.reshape(-1).tolist()
        counts = Counter(ids)  # expert -> routing decisions, first use first
        slots = self.store.fetch(self.layer_idx, counts)
        if len(ids) <= self.REMAP_IN_PYTHON:  # a decode step's few ids: one tensor from a list beats 4 tensor ops
            remapped = torch.tensor([slots[e] for e in ids], dtype=topk_ids.dtype,
                                    device=topk_ids.device).view(topk_ids.shape)
        else:  # expert -> slot; unused experts -> 0, unread
            lut = torch.zeros(self.num_experts, dtype=topk_ids.dtype, device=topk_ids.device)
            lut[list(slots)] = torch.tensor(list(slots.values()), dtype=topk_ids.dtype, device=topk_ids.device)
            remapped = lut[topk_ids]
        return ExpertWeights(self.store.w13, self.store.w2, remapped)  # [S,2I,H], [S,H,I], [T,K] slots

    def prefetch(self, expert_ids: torch.Tensor) -> int:
        return self.store.prefetch(self.layer_idx, [int(e) for e in expert_ids.reshape(-1).tolist()])

    def expect(self, uses: dict[int, list[int]]) -> None:
        self.store.expect(self.layer_idx, uses)

    def reads_in_flight(self) -> int:
        return self.store.reads_in_flight

    def wrong_guess_seconds(self) -> float:
        return self.store.wrong_guess_seconds()

    def set_scores(self, usage: torch.Tensor) -> None:
        self.store.policy.set_scores(self.layer_idx, [float(u) for u in usage.reshape(-1).tolist()])


class Offload:
    """A model's offloading between the two loader steps; afterwards kept as `model.expert_store`'s owner."""

    def __init__(self, model, budget: Budget, store: ExpertStore, model_dir: Path):
        self.model, self.budget, self.store, self.model_dir = model, budget, store, model_dir

    @property
    def tensor_names(self) -> set[str]:
        """Checkpoint tensors the loader must not read (the store reads them, by offset, when needed)."""
        return self.store.index.tensor_names

    def start(self) -> ExpertStore:
        """After the loader: set each layer's usage prior (MAR usage, else the calibration file), then stream
        the experts once (checksums, initial resident set)."""
        _unmap_small_weights(self.model)
        preferences = load_preferences(self.model_dir, self.model)  # None: a plain model never calibrated
        for block in self.model.moe_blocks():
            found = preferences.layers.get(block.layer_idx) if preferences is not None else None
            if found is not None:
                block.experts.set_scores(found.usage)
        self.store.start()
        b = self.budget
        logger.info("experts offloaded: %d of %d resident (%.2f GB of %.2f GB), policy %s", b.num_slots, b.total,
                    b.num_slots * b.expert_bytes / 2**30, b.total * b.expert_bytes / 2**30, self.store.policy.name)
        self.model.expert_store = self.store
        return self.store


# On a device: keep every expert in host RAM (the slow tier) when they take at most this share of the RAM available
# at load; else read them from the checkpoint through pinned staging buffers. "always" / "never": tests.
HOST_TIER = "auto"
HOST_TIER_MAX_SHARE = 0.8
STAGED: bool | None = None  # tests: True runs the device path's staging buffers and copies on the CPU


def _available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def use_host_tier(device: torch.device, all_expert_bytes: int) -> bool:
    """Whether the slow tier is host RAM: on an accelerator, when every expert fits in its share of the RAM
    available (on the CPU the fast tier is host RAM already: the slow tier is the checkpoint)."""
    if HOST_TIER != "auto":
        return HOST_TIER == "always"
    return device.type != "cpu" and all_expert_bytes <= HOST_TIER_MAX_SHARE * _available_ram()


def plan(model, config, model_dir: Path, files: dict[str, Path], dtype: torch.dtype, expert_cache: float = 1.0,
         expert_cache_gb: float | None = None, expert_policy: str = "lru", device: str = "cpu") -> Offload | None:
    """Before any weight is read: None when the budget holds every expert (the resident path, unchanged); else
    swap each MoE block's provider for an OffloadedExperts over one new store and return the Offload."""
    budget = budget_for(config, dtype, expert_cache, expert_cache_gb)
    if not budget.offloads:
        return None
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"expert offloading runs on the CPU or a CUDA device, not {device}; use expert_cache=1")
    index = CheckpointIndex.build(model, files)
    policy = make_policy(expert_policy, budget.num_layers)
    host_tier = use_host_tier(device, budget.total * budget.expert_bytes)
    if device.type != "cpu":
        logger.info("expert slots on %s; the slow tier is %s", device,
                    "host RAM (every expert read once, at start)" if host_tier else "the checkpoint on disk, read "
                    "through pinned host buffers (host RAM does not hold every expert)")
    store = ExpertStore(index, budget.num_slots, budget.min_slots, policy, config.hidden_size,
                        config.moe_intermediate_size, dtype, device=device, host_tier=host_tier, staged=STAGED)
    for block in model.moe_blocks():
        block.experts = OffloadedExperts(store, block.layer_idx, config.num_experts, config.hidden_size,
                                         config.moe_intermediate_size)
    return Offload(model, budget, store, model_dir)


def _unmap_small_weights(model) -> None:
    """Copy the weights the loader took straight from a file's mmap (those below a huge page) into memory of
    their own. Such a tensor keeps the whole file mapped, and with it every page readahead brought in around
    it, expert bytes included: mapped pages stay cached whatever posix_fadvise says, so the slow tier would
    quietly stay in RAM. Shared (tied) weights stay shared."""
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.numel() * t.element_size() >= hugepages.HUGE_PAGE:
                    continue
                if id(t) not in copies:
                    data = t.detach().clone()
                    copies[id(t)] = torch.nn.Parameter(data, requires_grad=False) \
                        if isinstance(t, torch.nn.Parameter) else data
                table[name] = copies[id(t)]

