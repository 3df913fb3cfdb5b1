"""`bash scripts/gpu_check.sh --smoke`: every step of the GPU check on this CPU with a tiny model (issue 22).

The full run needs a GPU; the smoke runs the same code (torch engine in float16, HF generate, verify costs,
the policy under the paper's acceptance, sampled requests, the self-checks, the Q8_0 conversion, llama-cpp-
python's `Llama`, exact and fast mode) so that none of it is first run on a rented GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_prints_a_sane_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable}
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--workdir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["mode"] == "smoke" and report["card"] == "cpu"

    torch_part = report["torch"]
    assert torch_part["self_check"]["passed"] and torch_part["self_check"]["dtype"] == "float16"
    costs = torch_part["verify_cost_ms"]
    assert {f"{b}x{t}" for b in (1, 4, 16) for t in (1, 2, 4, 8, 16, 32, 64, 128)} == set(costs)
    assert all(ms > 0 for ms in costs.values())
    plain = torch_part["plain"]
    assert plain["engine_tok_s"] > 0 and plain["hf_generate_tok_s"] > 0 and plain["engine_over_hf"] > 0
    assert isinstance(plain["same_tokens"], bool)
    assert set(torch_part["policy"]) == {"1", "4", "16"}
    assert all(c["size"] >= 1 and c["expected_tokens_per_step"] >= 1 for c in torch_part["policy"].values())
    sampled = torch_part["sampled"]
    assert sampled["requests"] == sampled["served"] == 8 and sampled["errors"] == []

    llama = report["llamacpp"]
    assert "skipped" in llama["cuda_build"]  # the smoke uses the CPU bindings installed in the venv
    assert llama["convert_q8_0"]["q8_0_mib"] > 0
    assert llama["llama_python_tok_s"] > 0 and llama["engine_over_llama_python"] > 0
    for mode in ("exact", "fast"):
        assert llama[mode]["self_check"]["passed"], llama[mode]["self_check"]
        assert llama[mode]["plain_tok_s"] > 0 and llama[mode]["batch_tok_s"] > 0 and llama[mode]["errors"] == []
    assert isinstance(llama["exact_equals_fast"], bool) and llama["fast_over_exact_batch"] > 0
