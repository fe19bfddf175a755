"""Model registry: one module per Hugging Face model_type, each defining its <Arch>ForCausalLM."""

from __future__ import annotations

import importlib

from marserve.config import SUPPORTED_MODEL_TYPES

# model_type -> (module, class name); modules are imported only when their architecture is loaded.
MODEL_REGISTRY = {
    "mixtral": ("marserve.models.mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("marserve.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("marserve.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "olmoe": ("marserve.models.olmoe", "OlmoeForCausalLM"),
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_MODEL_TYPES)


def get_model_class(model_type: str):
    module, cls = MODEL_REGISTRY[model_type]
    return getattr(importlib.import_module(module), cls)
