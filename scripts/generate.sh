#!/usr/bin/env bash
# Sets up .venv and runs the default model (or the MODEL_DIR given) offline on a prompt.
# The defaults below (48 greedy tokens, the prompt echoed) stay in force when flags are given: given
# flags come after them, and argparse lets a later flag win. The default prompt is used only if no
# --prompt is given (--prompt adds to a list, so it would make a batch of two).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
defaults=(--max-tokens 48 --temperature 0 --echo)
has_prompt=0
for arg in "$@"; do
  case "$arg" in --prompt|--prompt=*) has_prompt=1 ;; esac
done
if [ "$has_prompt" -eq 0 ]; then
  defaults+=(--prompt "def main(")
fi
exec .venv/bin/marserve generate "${defaults[@]}" "$@"
