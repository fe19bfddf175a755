#!/usr/bin/env bash
# Prints the key setup.sh stamps an installed .venv with: a hash of what the install depends on (the
# venv's Python version, both pyproject.toml files, setup.sh's own steps). A new key means "install again".
# Usage: setup_key.sh [PYTHON] (default: .venv/bin/python); run from anywhere, hashes this tree's files.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v sha256sum >/dev/null; then sha=(sha256sum); else sha=(shasum -a 256); fi  # macOS has only shasum
{
  "${1:-.venv/bin/python}" --version 2>&1
  cat pyproject.toml clients/pyproject.toml scripts/setup.sh
} | "${sha[@]}" | cut -d' ' -f1
