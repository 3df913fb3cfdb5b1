"""Done-when for the llama.cpp engine (issue 22): the vicuna miniature (2048 positions, like vicuna-7b) served
with `--speculation mc_sim_7b_63` answers 8 concurrent requests of ~600 prompt tokens + 120 new tokens, all 200.

On the old engine this load failed: the one unified cache had min(2048, 4096) = 2048 cells for every slot
("context is full" failed the whole batch), and 8 rows of the 42-leaf tree needed 336 sequence ids.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from vicuna_mini import BASE_ID, HEADS_ID

from nbkit.engine.loader import load_engine
from nbkit.notebook import hub
from nbkit.server.launch import start_server

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

pytestmark = pytest.mark.slow

N_REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 8, 600, 120


def test_eight_long_requests_with_a_fixed_tree_all_succeed(vicuna_mirror):
    pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")
    prepared = hub.prepare(BASE_ID, HEADS_ID, SimpleNamespace(engine="llamacpp", quantization="q8_0"),
                           mirror=vicuna_mirror)
    engine = load_engine("llamacpp", prepared.model, heads=prepared.heads, max_batch=N_REQUESTS,
                         speculation="mc_sim_7b_63")
    assert engine.runner.max_context == 2048
    tok = engine.tokenizer
    text = ("USER: Tell me a long story about a fox that lives near the river and the owl in the forest. "
            "ASSISTANT: Once upon a time a brown fox walked to the river. ") * 40
    base = tok(text, add_special_tokens=False)["input_ids"]
    assert len(base) >= PROMPT_TOKENS + N_REQUESTS
    prompts = [[1] + base[i: i + PROMPT_TOKENS - 1] for i in range(N_REQUESTS)]
    handle = start_server(engine, port=0)
    try:
        with httpx.Client(base_url=handle.url, timeout=600) as http:
            def ask(ids):
                return http.post("/v1/completions", json={"prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0})

            with ThreadPoolExecutor(N_REQUESTS) as pool:
                replies = list(pool.map(ask, prompts))
            info = http.get("/info").json()
    finally:
        handle.stop()
    assert [r.status_code for r in replies] == [200] * N_REQUESTS, [r.text for r in replies if r.status_code != 200]
    for r in replies:
        assert r.json()["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert info["kv_cells"] == engine.runner.kv_cells
    assert engine.counters["errors"] == 0 and engine.speculation.choices.get("mc_sim_7b_63", 0) > 0


def test_the_memory_arithmetic_matches_the_real_gguf_and_llama_cpps_kv_report(vicuna_mirror):
    """sizing.runner_bytes from config.json alone: the weights equal the Q8_0 GGUF's tensor bytes, and the KV
    cache equals what llama.cpp reports it allocated (the same arithmetic the plan's checks use at 7b/13b)."""
    import json
    import re

    from gguf import GGUFReader

    from nbkit.engine.llamacpp.sizing import ModelShape, runner_bytes

    pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")
    prepared = hub.prepare(BASE_ID, HEADS_ID, SimpleNamespace(engine="llamacpp", quantization="q8_0"),
                           mirror=vicuna_mirror)
    shape = ModelShape.from_config(json.loads((vicuna_mirror / BASE_ID / "config.json").read_text()))
    engine = load_engine("llamacpp", prepared.model, heads=prepared.heads, max_batch=4)
    runner = engine.runner
    got = runner_bytes(shape, "q8_0", runner.n_ctx, runner.k_type, runner.v_type)
    assert got["weights"] == sum(int(t.n_bytes) for t in GGUFReader(prepared.model).tensors)
    reported = [float(m.group(1)) for line in runner.context.kv_log
                if (m := re.search(r"size =\s*([\d.]+) MiB \(\s*\d+ cells", line))]
    assert reported and abs(reported[0] - got["kv"] / 2**20) < 0.01
