"""The bench model's calibration: `marserve bench experts` calibrates its random Mixtral-style model once.

That model is a plain checkpoint generated with random weights (marserve/bench/throughput.py `_model_dir`), so
it has no MAR usage and ships no mar_preferences.safetensors. Uncalibrated, the prefetcher falls back to the
router lookahead, whose softmax over 16 experts is nearly flat on random weights: no prediction reaches the
prefetcher's p >= 0.5 and nothing is prefetched. `marserve calibrate` fits the learned predictors, whose outputs
are calibrated P(expert picked); the benchmark runs it once (in a child process, exactly the command printed) and
the file stays beside the model for later runs. Weights and routing are unchanged: outputs are the same.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from marserve.errors import ConfigError
from marserve.experts.preferences import FILE_NAME

# `marserve calibrate`'s default (~2 min on this 2-core host): with 8192 tokens (~1 min) the next-layer predictor's
# held-out precision at p >= 0.5 fell from 0.63 to 0.57 (H=512 inputs; fewer tokens overfit).
CALIBRATION_TOKENS = 16384


def calibration_command(model_dir: Path, tokens: int = CALIBRATION_TOKENS, prompts: str | None = None) -> list[str]:
    return ["marserve", "calibrate", str(model_dir), "--tokens", str(tokens)] + (
        ["--prompts", prompts] if prompts else [])


def ensure_calibrated(model_dir: Path, tokens: int = CALIBRATION_TOKENS, prompts: str | None = None) -> bool:
    """Calibrate model_dir unless it has its preferences file -> whether it was calibrated now.

    prompts: a text file for `--prompts` (default: the bundled corpus, built first if missing, ~100 s)."""
    if (Path(model_dir) / FILE_NAME).exists():
        return False
    command = calibration_command(model_dir, tokens, prompts)
    print(f"{model_dir}: no {FILE_NAME}, so the prefetcher would have only the router's flat guesses: calibrating it "
          f"once (`{shlex.join(command)}`; cached beside the model)", flush=True)
    # its progress bars and its `wrote ...` line go straight to our stderr / stdout
    done = subprocess.run([sys.executable, "-m", "marserve.cli", *command[1:]])
    if done.returncode != 0 or not (Path(model_dir) / FILE_NAME).exists():
        raise ConfigError(f"calibrating {model_dir} failed (exit {done.returncode}); run `{shlex.join(command)}` "
                          "to see why")
    return True
