"""Every kind of bad checkpoint gives one CheckpointError line naming the file/tensor, in Python and via the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from marserve.cli import main
from marserve.errors import CheckpointError
from marserve.loader import load_model


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite(path, fn, file="model.safetensors"):
    with safe_open(path / file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, path / file)


def _missing_dir(p):
    shutil.rmtree(p)


def _no_config(p):
    (p / "config.json").unlink()


def _unsupported(p):
    _edit_config(p, lambda c: c.update(model_type="llama"))


def _no_moe_fields(p):
    _edit_config(p, lambda c: [c.pop(k, None) for k in ("num_experts", "num_local_experts")])


def _missing_tensor(p):
    _rewrite(p, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))


def _unexpected_tensor(p):
    _rewrite(p, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))


def _wrong_shape(p):
    _rewrite(p, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 32)}))


def _truncated(p):
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt(p):
    (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _no_weights(p):
    (p / "model.safetensors").unlink()


def _bad_mar_version(p):
    _edit_config(p, lambda c: c.update(mar={"version": 7, "memory_slots": 4, "affinity_scale": 1.0, "layers": None}))


def _mar_without_tensors(p):
    _edit_config(p, lambda c: c.update(mar={"version": 1, "memory_slots": 4, "affinity_scale": 1.0, "layers": None}))


CASES = [
    (_missing_dir, "does not exist"),
    (_no_config, "config.json: file not found"),
    (_unsupported, "'llama' is not supported; supported: mixtral, qwen2_moe, qwen3_moe, olmoe"),
    (_no_moe_fields, "lacks the MoE fields"),
    (_missing_tensor, "tensor model.layers.1.mlp.experts.2.up_proj.weight is missing"),
    (_unexpected_tensor, "model.safetensors: unexpected tensor model.layers.0.mlp.extra.weight"),
    (_wrong_shape, "tensor model.layers.0.self_attn.q_proj.weight has shape [8, 32], expected [32, 32]"),
    (_truncated, "model.safetensors: truncated or corrupt"),
    (_corrupt, "model.safetensors: truncated or corrupt"),
    (_no_weights, "no model.safetensors"),
    (_bad_mar_version, "mar.version 7 is not supported"),
    (_mar_without_tensors, "config.json: its \"mar\" block covers this layer but tensor model.layers.0.mlp.mar.memory is missing"),
]


@pytest.mark.parametrize("breaker,message", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_checkpoint_error(baby_checkpoint, tmp_path, capsys, breaker, message):
    path = _copy(baby_checkpoint("qwen3_moe"), tmp_path)
    breaker(path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    # Through the CLI: one line on stderr, exit code 1.
    capsys.readouterr()  # drop output of building the baby checkpoint
    assert main(["generate", str(path), "--prompt", "hi", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("marserve: error:")


def test_mar_memory_wrong_shape(baby_checkpoint, tmp_path):
    path = _copy(baby_checkpoint("mixtral", mar=True), tmp_path)
    key = "model.layers.1.block_sparse_moe.mar.memory"
    _rewrite(path, lambda t: t.update({key: torch.zeros(4, 3, 32)}), file="model-mar.safetensors")
    with pytest.raises(CheckpointError, match=rf"model-mar.safetensors: tensor {key} has shape \[4, 3, 32\], "
                                              r"expected \[4, 4, 32\]"):
        load_model(path)


def test_cli_subprocess_one_line_no_traceback(baby_checkpoint, tmp_path):
    bad = tmp_path / "nothing-here"
    truncated = _copy(baby_checkpoint("qwen3_moe"), tmp_path)
    _truncated(truncated)
    cases = [(["generate", str(bad), "--prompt", "x"], "does not exist"), (["inspect", str(bad)], "does not exist"),
             (["generate", str(truncated), "--prompt", "x"], "truncated or corrupt")]
    for cmd, message in cases:
        r = subprocess.run([sys.executable, "-m", "marserve.cli", *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0 and message in r.stderr
