"""Where each expert's bytes are: for every (MoE layer, expert), the byte ranges of the checkpoint's safetensors
files that hold its weights, and which rows of the expert's w13 / w2 each range fills.

The slow tier of the expert store reads these ranges by offset; nothing else of the file is touched. Both
checkpoint layouts map to contiguous ranges: per-expert tensors (`...experts.{e}.w1.weight` / `gate_proj`, one
range per tensor) and stacked ones (`experts.gate_up_proj` [E,2I,H], `experts.down_proj` [E,H,I]: expert e is
row block e, itself contiguous). Sharded checkpoints just name several files.

Legend: E=experts per layer, I=expert intermediate size, H=hidden size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from marserve.errors import CheckpointError

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_EXPERT_TARGETS = (".experts.w13", ".experts.w2")


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, the parsed JSON header) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return 8 + n, json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors header ({e})") from None


def is_expert_target(target: str) -> bool:
    """Whether a parameter name (Model.checkpoint_target's answer) is a layer's stacked expert weights."""
    return target.endswith(_EXPERT_TARGETS)


@dataclass(frozen=True)
class Piece:
    """One contiguous byte range of a file that fills rows [row0, row0 + rows) of an expert's w13 or w2."""

    path: Path
    offset: int  # absolute, in the file
    nbytes: int
    dtype: torch.dtype  # as stored
    target: str  # "w13" [2I,H] or "w2" [H,I]
    row0: int
    rows: int
    tensor: str  # the checkpoint tensor name (error messages)


class CheckpointIndex:
    """pieces[layer_idx][e] -> the Pieces of expert e of that MoE layer; tensor_names = checkpoint tensors covered."""

    def __init__(self, pieces: dict[int, list[list[Piece]]], tensor_names: set[str]):
        self.pieces = pieces
        self.tensor_names = tensor_names

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.pieces)

    @property
    def keys(self) -> list[tuple[int, int]]:
        """Every expert as (layer_idx, expert), in the order the store streams them at start."""
        return [(layer, e) for layer, per in self.pieces.items() for e in range(len(per))]

    def file_bytes(self, layer_idx: int, expert: int) -> int:
        """Bytes of one expert on disk."""
        return sum(p.nbytes for p in self.pieces[layer_idx][expert])

    @classmethod
    def build(cls, model, files: dict[str, Path]) -> "CheckpointIndex":
        """From the headers of the checkpoint's files (tensor name -> file, as loader.checkpoint_files gives) and
        the model's name mapping (model.checkpoint_target). Raises CheckpointError for a wrong shape or an expert
        whose weights are incomplete."""
        blocks = {f"{prefix}.experts": m for prefix, m in model.named_modules()
                  if type(m).__name__ == "SparseMoeBlock"}
        pieces = {b.layer_idx: [[] for _ in range(b.experts.num_experts)] for b in blocks.values()}
        names: set[str] = set()
        headers: dict[Path, tuple[int, dict]] = {}
        for name, path in files.items():
            target, expert, half = model.checkpoint_target(name)
            if not is_expert_target(target):
                continue
            block = blocks.get(target.rsplit(".", 1)[0])
            if block is None:
                continue  # not an MoE layer of this model: the loader reports it as unexpected
            if path not in headers:
                headers[path] = read_header(path)
            start, header = headers[path]
            if name not in header:
                raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
            pieces_of = pieces[block.layer_idx]
            for e, piece in _pieces(path, start, name, header[name], target.rsplit(".", 1)[1], expert, half,
                                    block.experts):
                pieces_of[e].append(piece)
            names.add(name)
        for layer_idx, per_expert in pieces.items():
            for e, ps in enumerate(per_expert):
                _check_covered(layer_idx, e, ps, blocks)
        return cls(pieces, names)


def _pieces(path, start, name, entry, which, expert, half, provider):
    """(expert, Piece) for one checkpoint tensor: one piece per-expert, E pieces for a stacked tensor."""
    dtype = ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    E, H, I = provider.num_experts, provider.hidden_size, provider.intermediate_size
    one = (2 * I, H) if which == "w13" else (H, I)  # one expert's whole matrix
    if expert is not None:
        want = (I, H) if half is not None else one
    else:
        want = (E, *one)
    shape = tuple(entry["shape"])
    if shape != want:
        raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, expected {list(want)}")
    begin, end = entry["data_offsets"]
    size = torch.empty((), dtype=dtype).element_size()
    if end - begin != math.prod(shape) * size:
        raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes, expected {math.prod(shape) * size}")
    if expert is not None:
        rows = want[0]
        row0 = 0 if half is None else half * I
        yield expert, Piece(path, start + begin, end - begin, dtype, which, row0, rows, name)
        return
    per = math.prod(one) * size
    for e in range(E):
        yield e, Piece(path, start + begin + e * per, per, dtype, which, 0, one[0], name)


def _check_covered(layer_idx: int, e: int, ps: list[Piece], blocks) -> None:
    provider = next(b.experts for b in blocks.values() if b.layer_idx == layer_idx)
    I, H = provider.intermediate_size, provider.hidden_size
    for which, rows in (("w13", 2 * I), ("w2", H)):
        covered = sorted((p.row0, p.rows) for p in ps if p.target == which)
        at = 0
        for row0, n in covered:
            if row0 != at:
                break
            at += n
        if at != rows or len(covered) > 2:
            prefix = next(p for p, b in blocks.items() if b.layer_idx == layer_idx)
            raise CheckpointError(f"layer {layer_idx}: the checkpoint's {which} weights of expert {e} are "
                                  f"missing or repeated (under {prefix})")
