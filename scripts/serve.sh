#!/usr/bin/env bash
# Sets up .venv and serves the default model (or the MODEL_DIR and flags given) over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/marserve serve "$@"
