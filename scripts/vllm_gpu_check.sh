#!/usr/bin/env bash
# vLLM with nbkit-exported Medusa heads on a GPU: throughput and acceptance against no speculation.
# NOT RUN YET: it awaits a session that is lent a GPU (CI has none). Needs, on the GPU machine:
#   - nbkit's venv (torch with CUDA, transformers) as $PY, and a vLLM $VLLM_VERSION install whose
#     `vllm` command is on PATH (pip install vllm==0.32.0, or its wheels carried over: no network there);
#   - the embedded SmolLM2 tokenizer in nbkit's cache (vLLM needs a local tokenizer; none is downloaded).
# The base model is random-weight with vicuna-7b's shape (32 layers, hidden 4096, MLP 11008, 32 heads) except
# the vocabulary (SmolLM2's 49152, to match the only local tokenizer). The heads are nbkit's untrained
# shared-lm_head heads: their ResBlocks start at zero, so each head proposes the base model's own next token,
# which a random model that repeats itself accepts; a measure of vLLM's Medusa plumbing and overhead, not of
# trained heads. Usage: scripts/vllm_gpu_check.sh [OUT_DIR]   (about 10 minutes on one H100/H200)
set -euo pipefail
OUT=${1:-${OUT:-/tmp/vllm-gpu-check}}
PY=${PY:-python}
PORT=${PORT:-8011}
mkdir -p "$OUT"
VLLM_VERSION=$("$PY" -c 'from nbkit.medusa.vllm import VLLM_VERSION; print(VLLM_VERSION)')
vllm --version | grep -q "$VLLM_VERSION" || { echo "needs vllm==$VLLM_VERSION on PATH" >&2; exit 2; }

"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nbkit.medusa.export import export_for_vllm
from nbkit.medusa.heads import MedusaHeads, save_heads
from nbkit.models import embedded_hf_dir

out = Path(sys.argv[1])
base = out / "random-vicuna-7b-shape"
if not (base / "config.json").is_file():
    tok = AutoTokenizer.from_pretrained(embedded_hf_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(base)
    tok.save_pretrained(base)
heads = save_heads(MedusaHeads(4096, 5), out / "nbkit-heads")  # untrained: each head copies the base lm_head
export_for_vllm(heads, out / "vllm-heads", model=base, base_name=str(base), full_vocab=True)
PYEOF

BASE="$OUT/random-vicuna-7b-shape"
run() {  # NAME [extra vllm serve args...]
  local name=$1; shift
  vllm serve "$BASE" --port "$PORT" --dtype float16 --max-model-len 2048 "$@" > "$OUT/serve-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
  for c in 1 16 64; do
    vllm bench serve --backend vllm --model "$BASE" --port "$PORT" --dataset-name random --random-input-len 128 \
      --random-output-len 128 --num-prompts $((c * 4 > 32 ? c * 4 : 32)) --max-concurrency "$c" --ignore-eos \
      --save-result --result-dir "$OUT" --result-filename "bench-$name-c$c.json" > "$OUT/bench-$name-c$c.log" 2>&1
  done
  curl -s "localhost:$PORT/metrics" | grep -E '^vllm:spec_decode' > "$OUT/spec-metrics-$name.txt" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
run off
for k in 1 3 5; do
  run "medusa-k$k" --speculative-config "{\"method\": \"medusa\", \"model\": \"$OUT/vllm-heads\", \"num_speculative_tokens\": $k}"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("bench-*-c*.json")):
    name, c = f.stem.removeprefix("bench-").rsplit("-c", 1)
    rows.setdefault(name, {})[int(c)] = round(json.loads(f.read_text())["output_throughput"], 1)
for f in sorted(out.glob("spec-metrics-*.txt")):
    rows.setdefault(f.stem.removeprefix("spec-metrics-"), {})["metrics"] = f.read_text().splitlines()
(out / "summary.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PYEOF
