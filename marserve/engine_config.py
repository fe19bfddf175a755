"""EngineConfig: everything the engine needs to start, from LLM(...) keywords or CLI flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marserve.errors import ConfigError


@dataclass
class EngineConfig:
    model: str | Path
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    kv_cache_gb: float = 1.0  # memory for the paged KV cache
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 2048  # tokens computed in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # None = the model's max_position_embeddings, capped by the KV cache
    enable_prefix_caching: bool = True
    # Expert offloading (docs/offload.md): the share of all expert bytes kept in fast memory (1.0 = every expert
    # resident, the default), or a size in GB instead; the eviction policy; whether experts are read ahead.
    expert_cache: float = 1.0
    expert_cache_gb: float | None = None
    expert_policy: str = "lru"
    prefetch: bool = True
    # Expert parallelism (marserve/engine/distributed.py): ranks launched by torchrun, each holding a share
    # of the experts; placement "mar" (affinity-aware, from MAR memory), "round_robin", or a JSON file from
    # `marserve inspect --placement N --placement-json FILE` (its best measured placement); a rank silent for
    # expert_parallel_timeout seconds ends the engine with an error; transport "all_to_all" or "gather".
    expert_parallel_size: int = 1
    expert_placement: str = "mar"
    expert_parallel_timeout: float = 60.0
    expert_transport: str = "all_to_all"

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_gb <= 0:
            raise ConfigError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.expert_parallel_size < 1:
            raise ConfigError(f"expert_parallel_size must be at least 1, got {self.expert_parallel_size}")
        if self.expert_placement not in ("mar", "round_robin") and not Path(self.expert_placement).is_file():
            raise ConfigError(f"expert_placement {self.expert_placement!r}: choose mar, round_robin or a JSON "
                              "file written by `marserve inspect --placement N --placement-json FILE`")
        if self.expert_transport not in ("all_to_all", "gather"):
            raise ConfigError(f"expert_transport {self.expert_transport!r}: choose all_to_all or gather")
        if self.expert_parallel_timeout <= 0:
            raise ConfigError(f"expert_parallel_timeout must be positive, got {self.expert_parallel_timeout}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 0 < self.expert_cache <= 1:
            raise ConfigError(f"expert_cache is a share of the experts' bytes in (0, 1], got {self.expert_cache}")
        if self.expert_cache_gb is not None:
            if self.expert_cache_gb <= 0:
                raise ConfigError(f"expert_cache_gb must be positive, got {self.expert_cache_gb}")
            if self.expert_cache != 1.0:
                raise ConfigError("give expert_cache (a share) or expert_cache_gb (a size), not both")
        from marserve.experts.policies import POLICIES
        if self.expert_policy not in POLICIES:
            raise ConfigError(f"expert_policy {self.expert_policy!r} is not one of {', '.join(POLICIES)}")
        from marserve.experts.offloaded import asks_for_offload
        if self.expert_parallel_size > 1 and asks_for_offload(self.expert_cache, self.expert_cache_gb):
            raise ConfigError("expert offloading (expert_cache, expert_cache_gb) and expert parallelism "
                              "(expert_parallel_size > 1) cannot be combined yet: choose one")
