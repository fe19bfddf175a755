"""scripts/generate.sh: its defaults stay when flags are given, a later flag wins, and the prompt is echoed.

The real script runs in a throw-away copy of the tree where setup.sh does nothing and .venv/bin/marserve
prints the arguments it was given, one per line.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "generate.sh"


@pytest.fixture
def run_script(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "generate.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    marserve = tmp_path / ".venv" / "bin" / "marserve"
    marserve.parent.mkdir(parents=True)
    marserve.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    marserve.chmod(0o755)

    def run(*flags: str) -> list[str]:
        out = subprocess.run(["bash", str(tmp_path / "scripts" / "generate.sh"), *flags], capture_output=True,
                             text=True, check=True)
        return out.stdout.splitlines()

    return run


def _last(argv: list[str], flag: str) -> str:
    """The value argparse keeps for a single-valued flag: the last one given."""
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def test_no_flags_run_the_defaults(run_script):
    argv = run_script()
    assert argv[0] == "generate"
    assert _last(argv, "--max-tokens") == "48" and _last(argv, "--temperature") == "0" and "--echo" in argv
    assert argv.count("--prompt") == 1 and _last(argv, "--prompt") == "def main("


def test_given_flags_add_to_the_defaults_and_a_later_flag_wins(run_script):
    argv = run_script("--prompt", "The river", "--temperature", "0.7")
    assert argv.count("--prompt") == 1 and _last(argv, "--prompt") == "The river"  # no batch with "def main("
    assert _last(argv, "--temperature") == "0.7"
    assert _last(argv, "--max-tokens") == "48" and "--echo" in argv


def test_a_prompt_given_as_prompt_equals_replaces_the_default_prompt(run_script):
    argv = run_script("--prompt=The river")
    assert "--prompt" not in argv and "--prompt=The river" in argv
