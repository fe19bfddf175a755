#!/usr/bin/env bash
# Creates .venv and installs marserve, its test extras and the client SDK into it, once: the install is
# stamped with scripts/setup_key.sh's key, and while the key holds later runs return at once (silently).
# Each step prints one line on stderr; a step that fails prints its whole output and stops the setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.marserve-setup-key

# step DESCRIPTION COMMAND...: one line, or the command's output when it fails.
step() {
  local what=$1 start=$SECONDS log rc=0
  shift
  log=$(mktemp)
  printf 'setup: %s ... ' "$what" >&2
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "done ($((SECONDS - start)) s)" >&2
  else
    echo "FAILED (exit $rc):" >&2
    cat "$log" >&2
  fi
  rm -f "$log"
  return "$rc"
}

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $PY" "$PY" -m venv .venv
fi
key=$(bash scripts/setup_key.sh .venv/bin/python)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ]; then
  exit 0
fi
rm -f "$STAMP"  # a half-finished install must not pass for a finished one
step "upgrading pip" .venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
step "installing torch 2.13.0" .venv/bin/python -m pip install -q "torch==2.13.0"
step "installing marserve[test] and marserve-client (editable)" \
  .venv/bin/python -m pip install -q -e ./clients -e ".[test]"
echo "$key" >"$STAMP"
echo "setup: .venv is ready; later runs skip the setup until pyproject.toml, clients/pyproject.toml," \
  "scripts/setup.sh or the Python version change" >&2
