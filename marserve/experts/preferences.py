"""Expert preferences of a checkpoint: per MoE layer the usage prior, the prototypes and the learned lookahead predictors.

Where they come from (`load_preferences`): MAR layers carry `mar_usage` / `mar_memory` in the checkpoint; plain
checkpoints get them from `MODEL_DIR/mar_preferences.safetensors`, written by `marserve calibrate`; the learned
predictors come from that file for both. Placement (the store's `set_scores`) reads `usage`; the prefetcher reads
the predictors.

The file (format "marserve-preferences", version "1"); l is the decoder layer index of a MoE layer
(`SparseMoeBlock.layer_idx`, as in the checkpoint's tensor names), d a distance counted in MoE layers (d=1 is the
next MoE layer, dense layers skipped):

    layers.{l}.usage                      [E]     f32  share of routed (token, expert) slots, sums to 1
    layers.{l}.prototypes                 [E,S,H] f32  unit-norm centres of the router inputs each expert took
    predictor.layers.{l}.ahead.{d}.weight [E,H]   f32  layer l's router input -> logits of MoE layer l+d
    predictor.layers.{l}.ahead.{d}.bias   [E]     f32
    predictor.embed.ahead.{d}.weight      [E,H]   f32  token embedding -> logits of the d-th MoE layer (d=1: the
    predictor.embed.ahead.{d}.bias        [E]     f32  first), used before the forward pass starts

Legend: E=experts, S=prototype slots, H=hidden size, T=tokens.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from marserve.errors import CheckpointError

FILE_NAME = "mar_preferences.safetensors"
FORMAT = "marserve-preferences"
VERSION = "1"
EMBED = -1  # the `layer` of the predictors that read token embeddings (they sit before MoE layer 0)

_KEY = re.compile(r"^(?:layers\.(\d+)\.(usage|prototypes)|predictor\.(?:layers\.(\d+)|embed)\.ahead\.(\d+)\.(weight|bias))$")


@dataclass
class LinearPredictor:
    """logits [T,E] = x [T,H] @ weight.T + bias: a learned guess of a later layer's router logits."""

    weight: torch.Tensor  # [E,H] f32
    bias: torch.Tensor  # [E] f32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.float(), self.weight.t())


@dataclass
class LayerPreferences:
    usage: torch.Tensor  # [E] f32, sums to 1
    prototypes: torch.Tensor | None = None  # [E,S,H] f32 unit vectors
    ahead: dict[int, LinearPredictor] = field(default_factory=dict)  # distance d -> predictor of MoE layer +d


@dataclass
class ExpertPreferences:
    """Per MoE layer (keyed by decoder layer index) preferences; `embed_ahead` predicts the first layers from tokens."""

    layers: dict[int, LayerPreferences]
    embed_ahead: dict[int, LinearPredictor] = field(default_factory=dict)
    source: str = "calibration"  # "mar" (checkpoint buffers) or "calibration" (the file), for reports
    metadata: dict[str, str] = field(default_factory=dict)

    def usage(self, layer_idx: int) -> torch.Tensor:
        """[E] placement prior of one MoE layer (higher = keep in fast memory)."""
        return self.layers[layer_idx].usage

    def predictor(self, layer_idx: int, distance: int) -> LinearPredictor | None:
        """The learned predictor of MoE layer (layer_idx's MoE position + distance); layer_idx=EMBED for tokens."""
        if layer_idx == EMBED:
            return self.embed_ahead.get(distance)
        prefs = self.layers.get(layer_idx)
        return prefs.ahead.get(distance) if prefs is not None else None

    @property
    def has_predictors(self) -> bool:
        return bool(self.embed_ahead) or any(p.ahead for p in self.layers.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors, by the key names of the module docstring."""
        out: dict[str, torch.Tensor] = {}
        for l, p in sorted(self.layers.items()):
            out[f"layers.{l}.usage"] = p.usage.float().contiguous()
            if p.prototypes is not None:
                out[f"layers.{l}.prototypes"] = p.prototypes.float().contiguous()
            for d, lin in sorted(p.ahead.items()):
                out[f"predictor.layers.{l}.ahead.{d}.weight"] = lin.weight.float().contiguous()
                out[f"predictor.layers.{l}.ahead.{d}.bias"] = lin.bias.float().contiguous()
        for d, lin in sorted(self.embed_ahead.items()):
            out[f"predictor.embed.ahead.{d}.weight"] = lin.weight.float().contiguous()
            out[f"predictor.embed.ahead.{d}.bias"] = lin.bias.float().contiguous()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the file atomically (a reader never sees half a file): tmp file, then rename."""
        from safetensors.torch import save_file
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update(format=FORMAT, version=VERSION)
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        try:
            save_file(self.tensors(), tmp, metadata=meta)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # an ordinary file's mode, not the private one the writer gives
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertPreferences":
        """Read a preferences file; CheckpointError (one line naming the file) if it is not one we can read."""
        from safetensors import safe_open
        try:
            with safe_open(os.fspath(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                                  f"expected {FORMAT!r} version {VERSION!r} (rerun `marserve calibrate`)")
        layers: dict[int, dict] = {}
        embed: dict[int, dict] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise CheckpointError(f"{path}: unexpected tensor {key!r}")
            if m.group(1) is not None:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = t.float()
            else:
                owner = embed if m.group(3) is None else layers.setdefault(int(m.group(3)), {}).setdefault("ahead", {})
                owner.setdefault(int(m.group(4)), {})[m.group(5)] = t.float()
        out = {}
        for l, parts in layers.items():
            if "usage" not in parts:
                raise CheckpointError(f"{path}: layers.{l}.usage is missing")
            out[l] = LayerPreferences(parts["usage"], parts.get("prototypes"),
                                      {d: _linear(path, f"predictor.layers.{l}.ahead.{d}", w)
                                       for d, w in parts.get("ahead", {}).items()})
        return cls(out, {d: _linear(path, f"predictor.embed.ahead.{d}", w) for d, w in embed.items()},
                   metadata=dict(meta))

    def check_against(self, model, where: str) -> None:
        """CheckpointError if these preferences do not fit `model` (other layers, expert count or hidden size)."""
        blocks = {b.layer_idx: b for b in model.moe_blocks()}
        for l, p in self.layers.items():
            block = blocks.get(l)
            if block is None:
                raise CheckpointError(f"{where}: has layer {l}, which is not a MoE layer of this model "
                                      f"(MoE layers: {sorted(blocks)}); rerun `marserve calibrate`")
            E, H = block.experts.num_experts, block.experts.hidden_size
            shapes = [("usage", p.usage, (E,))] + ([("prototypes", p.prototypes, None)] if p.prototypes is not None
                                                   else [])
            shapes += [(f"ahead.{d}", lin.weight, (E, H)) for d, lin in p.ahead.items()]
            for name, t, want in shapes:
                ok = tuple(t.shape) == want if want else (t.dim() == 3 and t.shape[0] == E and t.shape[2] == H)
                if not ok:
                    raise CheckpointError(f"{where}: layers.{l}.{name} has shape {tuple(t.shape)}, but this model has "
                                          f"{E} experts and hidden size {H}; rerun `marserve calibrate`")


def _linear(path, key: str, parts: dict) -> LinearPredictor:
    if "weight" not in parts:
        raise CheckpointError(f"{path}: {key}.weight is missing")
    w = parts["weight"]
    return LinearPredictor(w, parts.get("bias", torch.zeros(w.shape[0])))


def load_preferences(model_dir: str | os.PathLike, model) -> ExpertPreferences | None:
    """The model's expert preferences: MAR buffers where a layer has memory, the calibration file for the rest and
    for the predictors; None when the checkpoint has neither (a plain checkpoint never calibrated)."""
    path = os.path.join(os.fspath(model_dir), FILE_NAME)
    found = ExpertPreferences.load(path) if os.path.isfile(path) else None
    if found is not None:
        found.check_against(model, path)
    return combine(model, found)


def combine(model, calibrated: ExpertPreferences | None) -> ExpertPreferences | None:
    """A MAR model's own usage and memory where its layers have them, `calibrated` for the rest and for the
    predictors (a plain model: `calibrated` as is)."""
    blocks = model.moe_blocks()
    if not any(b.has_mar for b in blocks):
        return calibrated
    layers = {}
    for b in blocks:
        found = calibrated.layers.get(b.layer_idx) if calibrated is not None else None
        if b.has_mar:
            # Buffers may sit in the model dtype; float32 copies keep the preferences independent of them.
            layers[b.layer_idx] = LayerPreferences(b.mar_usage.detach().float().clone(),
                                                   b.mar_memory.detach().float().clone(),
                                                   found.ahead if found is not None else {})
        elif found is not None:
            layers[b.layer_idx] = found
        else:  # a layer without memory in a partly-MAR model, never calibrated: no preference among its experts
            E = b.experts.num_experts
            layers[b.layer_idx] = LayerPreferences(torch.full((E,), 1.0 / E))
    return ExpertPreferences(layers, calibrated.embed_ahead if calibrated is not None else {}, source="mar",
                             metadata=calibrated.metadata if calibrated is not None else {})
