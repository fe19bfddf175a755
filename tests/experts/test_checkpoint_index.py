"""CheckpointIndex: every expert's byte ranges, for per-expert, stacked and sharded checkpoints, read back equal the
weights the resident loader puts in the model; wrong shapes and missing experts are named."""

import pytest
import torch

from marserve.errors import CheckpointError
from marserve.experts.checkpoint_index import CheckpointIndex
from marserve.loader import checkpoint_files, load_model
from marserve.config import ModelConfig
from marserve.models import get_model_class
from tests.experts.checkpoints import SIZES, stacked_copy

def _meta_model(path):
    config = ModelConfig.from_dir(path)
    with torch.device("meta"):
        return get_model_class(config.model_type)(config)

def _read(piece):
    with open(piece.path, "rb") as f:
        f.seek(piece.offset)
        raw = bytearray(f.read(piece.nbytes))
    return torch.frombuffer(raw, dtype=piece.dtype)

def _check_against_resident(path):
    model, _ = load_model(path, dtype="float32")
    index = CheckpointIndex.build(_meta_model(path), checkpoint_files(path))
    blocks = {b.layer_idx: b for b in model.moe_blocks()}
    assert index.layer_ids == sorted(blocks)
    for layer, per_expert in index.pieces.items():
        w13, w2 = blocks[layer].experts.resident()
        for e, pieces in enumerate(per_expert):
            got13, got2 = torch.full_like(w13[e], float("nan")), torch.full_like(w2[e], float("nan"))
            for p in pieces:
                dest = got13 if p.target == "w13" else got2
                dest[p.row0:p.row0 + p.rows] = _read(p).view(p.rows, -1).float()
            torch.testing.assert_close(got13, w13[e], rtol=0, atol=0)
            torch.testing.assert_close(got2, w2[e], rtol=0, atol=0)
    return index

@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_per_expert_checkpoint(baby_checkpoint, model_type):
    index = _check_against_resident(baby_checkpoint(model_type, **SIZES))
    assert all(len(ps) == 3 for per in index.pieces.values() for ps in per)  # gate, up, down tensors

def test_stacked_checkpoint(baby_checkpoint, tmp_path):
    path = stacked_copy(baby_checkpoint("qwen3_moe", **SIZES), tmp_path / "stacked")
    index = _check_against_resident(path)
    assert all(len(ps) == 2 for per in index.pieces.values() for ps in per)  # a row block of each stacked tensor
    assert any(n.endswith("experts.gate_up_proj") for n in index.tensor_names)

def test_sharded_checkpoint(baby_checkpoint):
    path = baby_checkpoint("olmoe", sharded=True, mar=True, **SIZES)
    index = _check_against_resident(path)
    assert len({p.path for per in index.pieces.values() for ps in per for p in ps}) > 1

def test_bf16_checkpoint_pieces_keep_the_file_dtype(baby_checkpoint):
    path = baby_checkpoint("mixtral", dtype="bfloat16", **SIZES)
    index = CheckpointIndex.build(_meta_model(path), checkpoint_files(path))
    assert {p.dtype for per in index.pieces.values() for ps in per for p in ps} == {torch.bfloat16}
    _check_against_resident(path)

def test_missing_expert_is_named(baby_checkpoint, tmp_path):
    path = stacked_copy(baby_checkpoint("qwen3_moe", **SIZES), tmp_path / "broken")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.down_proj"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layer 2: the checkpoint's w2 weights of expert 0"):
        CheckpointIndex.build(_meta_model(path), checkpoint_files(path))

def test_wrong_shape_is_named(baby_checkpoint, tmp_path):
    path = stacked_copy(baby_checkpoint("qwen3_moe", **SIZES), tmp_path / "shape")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor {name} has shape"):
        CheckpointIndex.build(_meta_model(path), checkpoint_files(path))
