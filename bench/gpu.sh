#!/usr/bin/env bash
# One-shot GPU benchmark for a single-GPU machine with only this repo on it (see bench/gpu_bench.py).
# Installs what it needs (the package itself; torch must already be there), builds an HW4-size synthetic
# set in memory, prints the figures and writes them as JSON (bench/out/gpu.json, or $OUT/gpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, torchaudio, numpy, yaml, rich" 2>/dev/null; then
  "$PY" -m pip install -q torch torchaudio numpy pyyaml rich
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package runs from the checkout, no install step
exec "$PY" bench/gpu_bench.py "$@"
