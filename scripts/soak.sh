#!/usr/bin/env bash
# The soak (docs/reliability.md): `marserve serve` under 64 concurrent clients for MINUTES (default 30), then
# SIGTERM and SIGKILL under load; prints the summary table and exits 1 if a check failed.
#   bash scripts/soak.sh [MINUTES] [--expert-cache 0.25] [--clients N] [--out DIR]
# PYTHON=/path/to/python uses that interpreter as it is; otherwise .venv is set up first (scripts/setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=30
if [ "$#" -gt 0 ] && [[ "$1" =~ ^[0-9.]+$ ]]; then
  minutes=$1
  shift
fi
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  bash scripts/setup.sh || exit 1
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD:$PWD/kernels:$PWD/server:$PWD/clients${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m tests.soak.soak --minutes "$minutes" "$@"
