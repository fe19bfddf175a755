"""The preferences file round-trips; load_preferences takes MAR buffers, the calibration file, or gives None."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from marserve.errors import CheckpointError
from marserve.experts.preferences import (EMBED, FILE_NAME, ExpertPreferences, LayerPreferences, LinearPredictor,
                                          load_preferences)
from marserve.loader import load_model


def _random_prefs(layer_ids, E=4, S=3, H=32, seed=0) -> ExpertPreferences:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for n, l in enumerate(layer_ids):
        usage = torch.rand(E, generator=g)
        ahead = {d: LinearPredictor(torch.randn(E, H, generator=g), torch.randn(E, generator=g))
                 for d in range(1, len(layer_ids) - n)}
        layers[l] = LayerPreferences(usage / usage.sum(), torch.randn(E, S, H, generator=g), ahead)
    embed = {1: LinearPredictor(torch.randn(E, H, generator=g), torch.randn(E, generator=g))}
    return ExpertPreferences(layers, embed, metadata={"tokens": "123"})


def test_file_round_trip_with_the_documented_keys_and_metadata(tmp_path):
    prefs = _random_prefs([0, 1, 2])
    path = tmp_path / FILE_NAME
    prefs.save(path)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["format"] == "marserve-preferences" and meta["version"] == "1" and meta["tokens"] == "123"
    assert {"layers.0.usage", "layers.2.prototypes", "predictor.layers.0.ahead.2.weight",
            "predictor.layers.1.ahead.1.bias", "predictor.embed.ahead.1.weight"} <= keys
    back = ExpertPreferences.load(path)
    assert back.tensors().keys() == prefs.tensors().keys()
    for k, t in prefs.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    assert back.predictor(0, 2) is not None and back.predictor(2, 1) is None and back.predictor(EMBED, 1) is not None
    x = torch.randn(5, 32)
    assert torch.allclose(back.predictor(0, 1)(x), x @ prefs.predictor(0, 1).weight.t() + prefs.predictor(0, 1).bias)


def test_a_file_of_another_format_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / FILE_NAME
    save_file({"layers.0.usage": torch.ones(4)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match="marserve calibrate") as e:
        ExpertPreferences.load(path)
    assert "\n" not in str(e.value)


def test_mar_checkpoint_takes_usage_and_memory_from_its_buffers(baby_checkpoint, tmp_path):
    src = baby_checkpoint("qwen3_moe", mar=True, num_layers=3)
    model, _ = load_model(src)
    prefs = load_preferences(src, model)
    assert prefs.source == "mar" and not prefs.has_predictors
    for b in model.moe_blocks():
        assert torch.equal(prefs.usage(b.layer_idx), b.mar_usage.float())
        assert torch.equal(prefs.layers[b.layer_idx].prototypes, b.mar_memory.float())
    # With a calibration file beside it: predictors from the file, usage still from the checkpoint.
    d = tmp_path / "mar"
    shutil.copytree(src, d)
    _random_prefs([0, 1, 2], E=4, S=4, H=32).save(d / FILE_NAME)
    prefs = load_preferences(d, model)
    assert prefs.source == "mar" and prefs.predictor(0, 1) is not None and prefs.predictor(EMBED, 1) is not None
    assert torch.equal(prefs.usage(1), model.moe_blocks()[1].mar_usage.float())


def test_plain_checkpoint_uses_the_file_or_has_none(baby_checkpoint, tmp_path):
    src = baby_checkpoint("mixtral", num_layers=3)
    model, _ = load_model(src)
    assert load_preferences(src, model) is None
    d = tmp_path / "plain"
    shutil.copytree(src, d)
    written = _random_prefs([0, 1, 2], E=4, S=3, H=32)
    written.save(d / FILE_NAME)
    prefs = load_preferences(d, model)
    assert prefs.source == "calibration"
    assert torch.equal(prefs.usage(2), written.usage(2))
    assert torch.equal(prefs.predictor(1, 1).weight, written.predictor(1, 1).weight)


def test_a_file_calibrated_for_another_model_is_refused(baby_checkpoint, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(baby_checkpoint("mixtral", num_layers=3), d)
    _random_prefs([0, 1, 2], E=8, H=32).save(d / FILE_NAME)  # 8 experts; the model has 4
    model, _ = load_model(d)
    with pytest.raises(CheckpointError, match="4 experts"):
        load_preferences(d, model)
