#!/usr/bin/env bash
# The serving table of docs/benchmarks.md for one model: starts `marserve serve` on 127.0.0.1, runs
# `marserve bench serve` at 1, 4, 16 and 64 concurrent clients against it, stops the server.
#
#   bash scripts/bench_serve.sh default     # the shipped model
#   bash scripts/bench_serve.sh bench       # the random Mixtral-style model of `marserve bench throughput`
#
# MARSERVE (default: marserve) is the command to run; PORT (default 8123) where the server listens;
# OUT (default bench_serve_<model>.json) the results, with the throughput plot beside it. Extra arguments
# go to `marserve bench serve` (e.g. --num-prompts 128).
set -euo pipefail
model=${1:?usage: bench_serve.sh default|bench [bench serve flags]}
shift
MARSERVE=${MARSERVE:-marserve}
PORT=${PORT:-8123}
OUT=${OUT:-bench_serve_${model}.json}
case "$model" in
  default) dir="" ;;
  # the model `marserve bench throughput --model bench` makes (and keeps in the temp directory)
  bench) dir=$(python -c 'from marserve.bench.throughput import _model_dir; print(_model_dir("bench"))') ;;
  *) dir=$model ;;
esac
# shellcheck disable=SC2086 # $MARSERVE may be "python -m marserve.cli"
$MARSERVE serve $dir --port "$PORT" --log-level warning &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
for _ in $(seq 300); do
  python -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" \
    2>/dev/null && break
  kill -0 "$server" || exit 1
  sleep 1
done
# shellcheck disable=SC2086
$MARSERVE bench serve --base-url "http://127.0.0.1:$PORT" --max-concurrency 1,4,16,64 --num-prompts 64 \
  --input-len 128 --output-len 64 --tokenizer default --goodput ttft:1000 tpot:100 --output "$OUT" "$@"
