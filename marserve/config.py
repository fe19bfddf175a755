"""Model configuration parsed from a checkpoint's config.json: ModelConfig (architecture) and MarConfig (MAR block)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from marserve.errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
KNOWN_MAR_VERSIONS = (1,)


@dataclass
class MarConfig:
    """The "mar" block: memory slots per expert, affinity weight (beta) and which MoE layers carry memory."""

    version: int
    memory_slots: int
    affinity_scale: float
    layers: list[int] | None = None  # None = every MoE layer

    def __post_init__(self):
        if self.version not in KNOWN_MAR_VERSIONS:
            raise ConfigError(f"mar.version {self.version!r} is not supported (this marserve knows "
                              f"{', '.join(map(str, KNOWN_MAR_VERSIONS))})")
        if not isinstance(self.memory_slots, int) or self.memory_slots < 1:
            raise ConfigError(f"mar.memory_slots must be a positive integer, got {self.memory_slots!r}")
        if not isinstance(self.affinity_scale, (int, float)):
            raise ConfigError(f"mar.affinity_scale must be a number, got {self.affinity_scale!r}")
        self.affinity_scale = float(self.affinity_scale)
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]

    @classmethod
    def from_dict(cls, d: dict) -> "MarConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"the \"mar\" block must be an object, got {type(d).__name__}")
        missing = [k for k in ("version", "memory_slots", "affinity_scale") if k not in d]
        if missing:
            raise ConfigError(f"the \"mar\" block lacks {', '.join(missing)}")
        return cls(version=d["version"], memory_slots=d["memory_slots"], affinity_scale=d["affinity_scale"],
                   layers=d.get("layers"))


@dataclass
class ModelConfig:
    """Architecture hyper-parameters under their Hugging Face names, plus the raw dict for anything else."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # I of one routed expert (mixtral calls it intermediate_size)
    intermediate_size: int  # dense-MLP width for mlp_only / non-sparse layers
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0  # qwen2_moe only; 0 = no shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ...}; None = default RoPE
    attention_bias: bool = False  # bias on q/k/v projections (qwen2_moe: qkv_bias)
    clip_qkv: float | None = None  # olmoe
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    mar: MarConfig | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.mar is not None and self.mar.layers is not None:
            bad = [i for i in self.mar.layers if not self.is_moe_layer(i)]
            if bad:
                raise ConfigError(f"mar.layers names {bad}, which are not MoE layers of this "
                                  f"{self.num_hidden_layers}-layer model")

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i has a sparse MoE block (else a dense MLP), as qwen2_moe/qwen3_moe decide."""
        if not 0 <= i < self.num_hidden_layers:
            return False
        if self.model_type in ("mixtral", "olmoe"):
            return True
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def has_mar(self, i: int) -> bool:
        """Whether MoE layer i carries MAR memory."""
        if self.mar is None or not self.is_moe_layer(i):
            return False
        return self.mar.layers is None or i in self.mar.layers

    @property
    def moe_block_name(self) -> str:
        """The MoE block's attribute name in checkpoint tensor names."""
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        num_experts = raw.get("num_experts") or raw.get("num_local_experts")
        if not num_experts or not raw.get("num_experts_per_tok"):
            raise ConfigError(f"config.json of model_type {model_type!r} lacks the MoE fields num_experts "
                              "(or num_local_experts) and num_experts_per_tok")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if name not in raw:
                raise ConfigError(f"config.json lacks {name}")
        heads = raw["num_attention_heads"]
        intermediate = raw.get("intermediate_size")
        moe_inter = intermediate if model_type in ("mixtral", "olmoe") else raw.get("moe_intermediate_size")
        if moe_inter is None:
            raise ConfigError("config.json lacks moe_intermediate_size")
        theta, scaling = _rope(raw)
        eos = raw.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # mixtral always renormalises its top-k; olmoe/qwen default to False in transformers.
        norm_topk = True if model_type == "mixtral" else bool(raw.get("norm_topk_prob", False))
        attention_bias = bool(raw.get("qkv_bias", True)) if model_type == "qwen2_moe" else bool(
            raw.get("attention_bias", False))
        return cls(
            model_type=model_type,
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            vocab_size=raw["vocab_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_experts=num_experts,
            num_experts_per_tok=raw["num_experts_per_tok"],
            moe_intermediate_size=moe_inter,
            intermediate_size=intermediate or moe_inter,
            norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=(raw.get("shared_expert_intermediate_size") or 0)
            if model_type == "qwen2_moe" else 0,
            decoder_sparse_step=raw.get("decoder_sparse_step") or 1,
            mlp_only_layers=list(raw.get("mlp_only_layers") or []),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=attention_bias,
            clip_qkv=raw.get("clip_qkv") if model_type == "olmoe" else None,
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=raw.get("pad_token_id"),
            mar=MarConfig.from_dict(raw["mar"]) if raw.get("mar") is not None else None,
            raw=raw,
        )

    @classmethod
    def from_dir(cls, model_dir) -> "ModelConfig":
        """Read <model_dir>/config.json; every problem is a CheckpointError naming the file."""
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise CheckpointError(f"{model_dir}: model directory does not exist")
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (a model directory needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None


def _rope(raw: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or the older rope_theta + rope_scaling."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type")
    if kind and kind != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling
