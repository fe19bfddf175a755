"""marserve: an inference-serving engine for Mixture-of-Experts models trained with Memory-Aware Routing."""

from pathlib import Path

__version__ = "0.1.0"

# The model `marserve generate` / `marserve serve` run when no model directory is named.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

__all__ = ["LLM", "SamplingParams", "AsyncEngine", "DEFAULT_MODEL_DIR", "__version__"]


def __getattr__(name):
    # Lazy: `import marserve` stays cheap (the CLI and the client-facing bits need no torch import).
    if name == "SamplingParams":
        from marserve.sampling_params import SamplingParams
        return SamplingParams
    if name == "LLM":
        from marserve.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from marserve.engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(f"module 'marserve' has no attribute {name!r}")
