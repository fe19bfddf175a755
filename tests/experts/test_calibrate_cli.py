"""`marserve calibrate`: writes the preferences file from sample prompts, leaves the weights alone, errors in one line."""

from __future__ import annotations

import hashlib
import json
import shutil

import torch

from marserve.cli import main
from marserve.experts.preferences import EMBED, FILE_NAME, ExpertPreferences, load_preferences
from marserve.loader import load_model

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def f(x): return x + 1", "1 2 3 4 5 6 7 8 9 0",
           "Hello world! How are you today? I am fine, thanks.", "mountains, cities and the weather"] * 4


def _copy(baby_checkpoint, tmp_path, **kw):
    d = tmp_path / "model"
    shutil.copytree(baby_checkpoint("olmoe", num_layers=3, **kw), d)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    return d, prompts


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_calibrate_writes_usage_prototypes_and_predictors_and_changes_no_weight(baby_checkpoint, tmp_path, capsys):
    d, prompts = _copy(baby_checkpoint, tmp_path)
    before = _digests(d)
    assert main(["calibrate", str(d), "--prompts", str(prompts), "--tokens", "400", "--lookahead", "2",
                 "--slots", "3", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    after = _digests(d)
    assert after.pop(FILE_NAME) and after == before  # only the new file; every checkpoint file byte-identical
    prefs = ExpertPreferences.load(d / FILE_NAME)
    assert sorted(prefs.layers) == [0, 1, 2]
    for p in prefs.layers.values():
        assert p.usage.shape == (4,) and abs(float(p.usage.sum()) - 1) < 1e-5
        assert p.prototypes.shape == (4, 3, 32)
        assert torch.allclose(p.prototypes.norm(dim=-1), torch.ones(4, 3), atol=1e-4)
    assert sorted(prefs.layers[0].ahead) == [1, 2] and sorted(prefs.layers[1].ahead) == [1] and not prefs.layers[2].ahead
    assert prefs.predictor(EMBED, 1) is not None
    model, _ = load_model(d)
    assert load_preferences(d, model).source == "calibration"


def test_calibrate_on_a_mar_checkpoint_adds_the_predictors(baby_checkpoint, tmp_path):
    d, prompts = _copy(baby_checkpoint, tmp_path, mar=True)
    assert main(["calibrate", str(d), "--prompts", str(prompts), "--tokens", "200", "--lookahead", "1", "-q"]) == 0
    model, _ = load_model(d)
    prefs = load_preferences(d, model)
    assert prefs.source == "mar" and prefs.predictor(0, 1) is not None
    assert torch.equal(prefs.usage(0), model.moe_blocks()[0].mar_usage.float())


def _one_line_error(argv, capsys, *needles):
    capsys.readouterr()  # what building the fixture printed
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("marserve: error:"), err
    for n in needles:
        assert n in err, err


def test_errors_are_one_line_with_exit_1(baby_checkpoint, tmp_path, capsys):
    _one_line_error(["calibrate", str(tmp_path / "nowhere")], capsys, "no such directory")
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    _one_line_error(["calibrate", str(dense)], capsys, "not an MoE checkpoint")
    d, prompts = _copy(baby_checkpoint, tmp_path)
    _one_line_error(["calibrate", str(d), "--prompts", str(prompts), "--out", str(tmp_path / "no" / "dir" / "f")],
                    capsys, "cannot write")
    _one_line_error(["calibrate", str(d), "--prompts", str(tmp_path / "missing.txt")], capsys, "missing.txt")
    assert not (d / FILE_NAME).exists()
