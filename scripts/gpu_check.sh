#!/usr/bin/env bash
# The GPU check (issue 22): torch and llama.cpp engines on random weights of vicuna-7b's shape in float16, on
# one H100 or A100 in at most 8 minutes; the last line printed is one JSON object (docs/ records the figures
# with the card). `--smoke`: the same steps on a CPU with a tiny model in under 3 minutes (no CUDA build),
# run by `make test`. The logic is nbkit/bench/gpu_check.py; this only picks the Python.
#   bash scripts/gpu_check.sh [--smoke] [--out FILE] [--workdir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m nbkit.bench.gpu_check "$@"
