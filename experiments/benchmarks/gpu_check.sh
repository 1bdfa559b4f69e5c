#!/usr/bin/env bash
# The engine benchmark (experiments/benchmarks/engine.py) on a CUDA GPU, in under 10 minutes:
# W1-W5, non-private vs dpclip (auto) vs Opacus (hooks, ghost), 20 timed steps each, peak CUDA
# memory per cell, and the correctness check (float64 per-sample loop on the CPU).
#
# Runs from a copy of the repository on a machine whose python3 has torch with CUDA (dpclip is
# used from the source tree, nothing is installed into that python). Opacus is optional: if
# python3 lacks it and a wheel lies in experiments/benchmarks/wheels/ (made here with
#   pip download opacus==1.6.0 --no-deps -d experiments/benchmarks/wheels
# and carried along), it is installed from there without dependencies; else its rows are
# skipped, each saying why. The JSON goes to $OUT (or /tmp) as results_engine_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" - <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check.sh: {sys.executable} has no torch; set PYTHON to a python with torch (CUDA build)")
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
if ! "$PY" -c "import opacus" 2>/dev/null; then
  shopt -s nullglob
  wheels=(experiments/benchmarks/wheels/opacus-*.whl)
  if ((${#wheels[@]})); then
    "$PY" -m pip install --quiet --no-deps "${wheels[0]}" || echo "gpu_check.sh: could not install ${wheels[0]}; Opacus rows will be skipped"
  else
    echo "gpu_check.sh: no opacus in $PY and no wheel in experiments/benchmarks/wheels/; Opacus rows will be skipped"
  fi
fi
out=${OUT:-/tmp}
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 560 "$PY" experiments/benchmarks/engine.py --device cuda \
  --models mlp,cnn,cifar,transformer,lstm-w5 --methods "dpclip auto,opacus hooks,opacus ghost" \
  --steps 20 --json "$out/results_engine_cuda.json"
