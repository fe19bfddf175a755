"""scripts/setup.sh installs once: a stamp keyed on the pyproject files, setup.sh and the Python version.

setup.sh runs in a throw-away copy of the scripts and pyproject files, with a fake .venv/bin/python that
logs its calls (and fails a pip install when FAIL_PIP is set), so no package is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "--version" ]; then echo "Python ${FAKE_PY_VERSION:-3.11.7}"; exit 0; fi
echo "$*" >> "$(dirname "$0")/calls.log"
if [ -n "${FAIL_PIP:-}" ]; then echo "pip: boom, no such distribution"; exit 1; fi
echo "Successfully installed, with some chatter that setup must not show"
"""


@pytest.fixture
def tree(tmp_path):
    for rel in ("scripts/setup.sh", "scripts/setup_key.sh", "pyproject.toml", "clients/pyproject.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def _setup(tree: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={**os.environ, **env})


def _calls(tree: Path) -> list[str]:
    log = tree / ".venv" / "bin" / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def _key(tree: Path, **env) -> str:
    return subprocess.run(["bash", str(tree / "scripts" / "setup_key.sh")], capture_output=True, text=True,
                          check=True, env={**os.environ, **env}).stdout.strip()


def test_key_changes_with_each_input_and_only_then(tree):
    key = _key(tree)
    assert len(key) == 64 and _key(tree) == key
    assert _key(tree, FAKE_PY_VERSION="3.12.1") != key
    (tree / "clients" / "pyproject.toml").write_text((tree / "clients" / "pyproject.toml").read_text() + "\n#\n")
    key2 = _key(tree)
    assert key2 != key
    (tree / "pyproject.toml").write_text((tree / "pyproject.toml").read_text() + "\n#\n")
    assert _key(tree) not in (key, key2)


def test_installs_once_then_skips_until_a_pyproject_changes(tree):
    first = _setup(tree)
    assert first.returncode == 0, first.stderr
    assert [c for c in _calls(tree) if "pip install" in c], "the first run installs"
    lines = first.stderr.splitlines()
    assert all(line.startswith("setup: ") for line in lines) and "chatter" not in first.stderr
    assert len(lines) == 4  # pip, torch, marserve + client, ready

    second = _setup(tree)
    assert second.returncode == 0 and second.stderr == "" and second.stdout == ""
    assert _calls(tree) == [], "the second run must not call pip"

    (tree / "clients" / "pyproject.toml").write_text((tree / "clients" / "pyproject.toml").read_text() + "\n#\n")
    third = _setup(tree)
    assert third.returncode == 0 and [c for c in _calls(tree) if "pip install" in c]


def test_a_failed_step_shows_its_output_and_leaves_no_stamp(tree):
    failed = _setup(tree, FAIL_PIP="1")
    assert failed.returncode != 0
    assert "FAILED" in failed.stderr and "boom, no such distribution" in failed.stderr
    _calls(tree)
    again = _setup(tree)  # no stamp was written, so the next run installs again
    assert again.returncode == 0 and [c for c in _calls(tree) if "pip install" in c]
