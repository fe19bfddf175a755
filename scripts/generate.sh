#!/usr/bin/env bash
# Sets up .venv and runs the default model (or the MODEL_DIR given) offline on a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- --prompt "def main(" --max-tokens 48 --temperature 0
fi
exec .venv/bin/marserve generate "$@"
