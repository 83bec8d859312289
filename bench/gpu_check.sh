#!/usr/bin/env bash
# One prepared GPU run (issue 16, point 5): the CUDA tests, then the GPU benchmark into
# bench/results/gpu.json and bench/RESULTS.md. Run from the repository root on a machine with CUDA,
# with a CUDA build of torch in the environment (PYTHON=... selects the interpreter):
#   bash bench/gpu_check.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_placement.py tests/tracing \
    -k "cuda" -x
"$PY" -m bench.run --only gpu
