#!/usr/bin/env bash
# End-to-end check of the product on a GPU machine, beside bench/gpu.sh's figures: a generated set ->
# `run` of the boss space (sampled architectures, margin heads, every pooling) with several trials per
# GPU -> `status` -> `export-top --strategy greedy` -> `vote` -> a submission CSV. Everything lives in a
# temporary folder; the submission is copied to $OUT (or bench/out). Extra arguments go to `run`
# (on a CPU machine: `bash bench/gpu_smoke.sh --workers 1`).
#   TRIALS (default 6) and STEPS (default 400) size it, SPACE (default boss) and PRESET (default small)
#   pick the space and the generated set; PYTHON picks the interpreter.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"   # runs from the checkout, no install step
out=${OUT:-$root/bench/out}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A stop (timeout's SIGTERM, Ctrl-C) reaches the whole process group: bash then waits for the running
# command to mark its trials and end before it exits, so the folder is not removed under its workers.
trap 'echo "$(basename "$0"): stopped" >&2; exit 143' TERM INT
cd "$work"
cli() { "$PY" -m search.cli "$@"; }
start=$(date +%s)
space=${SPACE:-boss}
cli synth --out data --preset "${PRESET:-small}" --quiet
cli run --space "$space" --study gpusmoke --trials "${TRIALS:-6}" --steps "${STEPS:-400}" --data data \
  "$@"   # not --quiet: a run stopped by a time cap still prints its last counts
cli status --study gpusmoke
cli export-top 3 --study gpusmoke --strategy greedy --quiet
cli vote studies/gpusmoke/export/greedy3 --data data --out submission.csv --quiet
mkdir -p "$out"
cp submission.csv "$out/smoke-submission.csv"
echo "gpu_smoke: $(($(wc -l < submission.csv) - 1)) predictions in $(($(date +%s) - start)) s"
