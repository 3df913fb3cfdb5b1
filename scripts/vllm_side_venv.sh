#!/usr/bin/env bash
# A side venv with vLLM's real code for scripts/vllm_cpu_check.py, WITHOUT touching nbkit's venv:
# it sees nbkit's packages (torch, transformers, safetensors) through a .pth file and adds vLLM
# (no dependencies: the CUDA ones would not install here) plus the few pure-Python modules that
# importing vLLM's Medusa, config and loader needs on a CPU. About 1 GB and a minute on a 2-core CPU.
# `make test` and `make test-vllm` build it in .cache/vllm-side (ignored) and point NBKIT_VLLM_PYTHON at it:
#   scripts/vllm_side_venv.sh [.cache/vllm-side] && NBKIT_VLLM_PYTHON=.cache/vllm-side/bin/python pytest ...
set -euo pipefail
SIDE=${1:-$(cd "$(dirname "$0")/.." && pwd)/.cache/vllm-side}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
VLLM_VERSION=$("$PY" -c 'from nbkit.medusa.vllm import VLLM_VERSION; print(VLLM_VERSION)')
"$PY" -m venv --system-site-packages "$SIDE"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  > "$SIDE/lib/python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages/nbkit-venv.pth"
"$SIDE/bin/pip" install -q --no-deps "vllm==$VLLM_VERSION"
"$SIDE/bin/pip" install -q cbor2 aiohttp openai-harmony pybase64 cachetools msgspec uvloop partial-json-parser \
  llguidance einops cloudpickle py-cpuinfo xgrammar==0.2.8
VLLM_TARGET_DEVICE=cpu "$SIDE/bin/python" -c 'import vllm.model_executor.models.medusa' && echo "vLLM $VLLM_VERSION ready in $SIDE"
