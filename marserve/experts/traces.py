"""Routing traces: which experts every token chose in every MoE layer, recorded from a live model and saved to disk.

A trace is what the expert-offloading benchmark replays (marserve/bench/expert_replay.py): one row per token
in the order the model saw them, one column per MoE layer, the top-k expert ids in each cell; optionally the
router inputs, so that a predictor (which needs the hidden state, not only the ids) can be evaluated later.

Legend: T=tokens recorded, L=MoE layers, K=active experts per token, H=hidden size, E=experts per layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from marserve.errors import ConfigError

TRACE_FORMAT = "marserve-routing-trace"
TRACE_VERSION = 1


@dataclass
class RoutingTrace:
    """Routing decisions of one run, token by token.

    topk_ids [T, L, K] int16; router_inputs [T, L, H] float16 or None; step [T] int32 = index of the forward
    pass the token was in (tokens of one pass share a step: a prefill chunk is one step with many tokens, a
    batch-1 decode step has one); usage [L, E] float32 or None = the model's placement prior (MAR usage or
    calibration) when the recorder could read one.
    """

    topk_ids: np.ndarray
    num_experts: int
    layer_ids: list[int]
    step: np.ndarray | None = None
    router_inputs: np.ndarray | None = None
    usage: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.topk_ids.ndim != 3:
            raise ConfigError(f"a routing trace's topk_ids must be [tokens, layers, k], got {self.topk_ids.shape}")
        T, L, _ = self.topk_ids.shape
        if len(self.layer_ids) != L:
            raise ConfigError(f"trace has {L} layers of ids but {len(self.layer_ids)} layer indices")
        if self.step is None:
            self.step = np.arange(T, dtype=np.int32)
        if T and (self.topk_ids.min() < 0 or self.topk_ids.max() >= self.num_experts):
            raise ConfigError(f"trace expert ids must be in [0, {self.num_experts})")

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    def save(self, path: str | Path) -> None:
        """One .npz file (numpy arrays + a JSON header), readable without marserve."""
        arrays = {"topk_ids": self.topk_ids.astype(np.int16), "step": self.step.astype(np.int32),
                  "header": np.frombuffer(json.dumps({
                      "format": TRACE_FORMAT, "version": TRACE_VERSION, "num_experts": self.num_experts,
                      "layer_ids": list(self.layer_ids), "meta": self.meta}).encode(), dtype=np.uint8)}
        if self.router_inputs is not None:
            arrays["router_inputs"] = self.router_inputs.astype(np.float16)
        if self.usage is not None:
            arrays["usage"] = self.usage.astype(np.float32)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        try:
            with np.load(path) as f:
                header = json.loads(bytes(f["header"]).decode())
                if header.get("format") != TRACE_FORMAT:
                    raise ConfigError(f"{path}: not a marserve routing trace")
                return cls(topk_ids=f["topk_ids"], num_experts=header["num_experts"], layer_ids=header["layer_ids"],
                           step=f["step"], router_inputs=f["router_inputs"] if "router_inputs" in f else None,
                           usage=f["usage"] if "usage" in f else None, meta=header.get("meta", {}))
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read a routing trace ({e})") from None


class TraceRecorder:
    """A routing_observer on every MoE block of a model that keeps the routing of each token.

    Polite: it remembers the observer a block already had (the prefetcher uses the same hook) and calls it
    first on every routing, so installing a recorder never turns prefetching off; uninstall() puts the
    previous observer back. Meant for one sequence at a time (batch-1 generation or one text): with several
    sequences in a pass their tokens would interleave in the trace.
    """

    def __init__(self, model, record_inputs: bool = False):
        self.blocks = model.moe_blocks()
        if not self.blocks:
            raise ConfigError("the model has no MoE layers to record")
        self.record_inputs = record_inputs
        self.layer_ids = [b.layer_idx for b in self.blocks]
        self._slot = {layer: i for i, layer in enumerate(self.layer_ids)}
        self._previous: dict[int, object] = {}
        self._installed: dict[int, object] = {}
        self._ids: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._steps: list[int] = []  # tokens per forward pass, appended when the first MoE layer routes

    def install(self) -> "TraceRecorder":
        for block in self.blocks:
            previous = block.routing_observer
            self._previous[block.layer_idx] = previous

            def observer(layer_idx, x, z, topk_ids, topk_weights, _previous=previous):
                if _previous is not None:
                    _previous(layer_idx, x, z, topk_ids, topk_weights)
                self(layer_idx, x, z, topk_ids, topk_weights)

            block.routing_observer = observer
            self._installed[block.layer_idx] = observer
        return self

    def uninstall(self) -> None:
        for block in self.blocks:
            # Only undo our own hook: if someone chained on top of us since, leave theirs in place.
            if block.routing_observer is self._installed.get(block.layer_idx):
                block.routing_observer = self._previous.get(block.layer_idx)
        self._installed.clear()

    @property
    def num_passes(self) -> int:
        """Forward passes recorded so far."""
        return len(self._steps)

    def __enter__(self) -> "TraceRecorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def __call__(self, layer_idx, x, z, topk_ids, topk_weights) -> None:
        slot = self._slot[layer_idx]
        if slot == 0:
            self._steps.append(topk_ids.shape[0])
        self._ids[slot].append(topk_ids.detach().to("cpu", torch.int16))
        if self.record_inputs:
            self._inputs[slot].append(x.detach().to("cpu", torch.float16))

    def trace(self, usage: np.ndarray | None = None, **meta) -> RoutingTrace:
        """Everything recorded so far as a RoutingTrace (usage defaults to the blocks' MAR usage if every
        MoE layer has one)."""
        if not self._steps:
            raise ConfigError("nothing was recorded: no forward pass ran while the recorder was installed")
        ids = np.stack([torch.cat(chunks).numpy() for chunks in self._ids], axis=1)  # [T, L, K]
        inputs = (np.stack([torch.cat(chunks).numpy() for chunks in self._inputs], axis=1)
                  if self.record_inputs else None)  # [T, L, H]
        step = np.repeat(np.arange(len(self._steps), dtype=np.int32), self._steps)
        if usage is None and all(getattr(b, "has_mar", False) for b in self.blocks):
            usage = np.stack([b.mar_usage.float().cpu().numpy() for b in self.blocks])
        return RoutingTrace(topk_ids=ids, num_experts=self.blocks[0].experts.num_experts, layer_ids=self.layer_ids,
                            step=step, router_inputs=inputs, usage=usage, meta=meta)


def record_text_trace(llm, windows: list[list[int]], record_inputs: bool = True, **meta) -> RoutingTrace:
    """The routing of texts read through `llm` (an LLM), window by window: each window is one prompt,
    prefilled alone (max_tokens=1), so the trace holds its tokens in order as if they had been generated one
    by one (a token's routing depends only on the tokens before it)."""
    from marserve.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    with TraceRecorder(llm.model, record_inputs=record_inputs) as recorder:
        for window in windows:
            llm.generate({"prompt_token_ids": window}, params, use_tqdm=False)
    return recorder.trace(**meta)
