"""Done when (torch): the vicuna miniature (2048 positions, like vicuna-7b) served by the torch engine with
`--speculation mc_sim_7b_63` and a KV budget answers 8 concurrent requests of ~600 prompt tokens + 120 new
tokens, all with HTTP 200, and /info advertises what the budget holds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from vicuna_mini import BASE_ID, HEADS_ID, HIDDEN, LAYERS

from nbkit.server.launch import start_server

pytestmark = pytest.mark.slow

CONCURRENT, PROMPT_TOKENS, NEW_TOKENS = 8, 600, 120
POSITIONS = 800  # per slot: 600 + 120 + the tree's 64 (+1 for the next token) fit, 2048 would not be allocated
KV_BUDGET = CONCURRENT * POSITIONS * 2 * LAYERS * HIDDEN * 4  # keys + values, float32 on a CPU


def long_prompt(tok, i: int) -> str:
    """A prompt of PROMPT_TOKENS - 10 to PROMPT_TOKENS tokens, different for each request."""
    words = f"Request {i}: the {['fox', 'owl', 'cat', 'dog'][i % 4]} plays in the garden and sings a song.".split()
    text = ""
    while len(tok(text + " " + words[0], add_special_tokens=False)["input_ids"]) < PROMPT_TOKENS - 10:
        text = f"{text} {words[0]}".strip()
        words = words[1:] + words[:1]
    return text


def test_eight_concurrent_long_requests_are_all_answered(vicuna_mirror, monkeypatch):
    """The old torch engine took no budget: 8 rows grew to the longest request by doubling, unbounded."""
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(vicuna_mirror))
    handle = start_server(model=BASE_ID, heads=HEADS_ID, engine="torch", port=0, max_batch=CONCURRENT,
                          speculation="mc_sim_7b_63", kv_budget_bytes=KV_BUDGET)
    try:
        engine = handle.engine
        engine.eos_ids = set()  # the miniature may end a text early: every request really decodes 120 tokens
        prompts = [long_prompt(engine.tokenizer, i) for i in range(CONCURRENT)]
        with httpx.Client(base_url=handle.url, timeout=600) as http:
            info = http.get("/info").json()
            assert info["max_total_tokens"] == POSITIONS - 1 - engine.tree_reserve  # what the budget holds
            with ThreadPoolExecutor(CONCURRENT) as pool:
                answers = list(pool.map(lambda p: http.post("/generate", json={"prompt": p, "max_tokens": NEW_TOKENS}),
                                        prompts))
        assert [r.status_code for r in answers] == [200] * CONCURRENT, [r.text for r in answers if r.status_code != 200]
        bodies = [r.json() for r in answers]
        assert all(PROMPT_TOKENS - 12 <= b["prompt_tokens"] <= PROMPT_TOKENS for b in bodies)
        assert [b["completion_tokens"] for b in bodies] == [NEW_TOKENS] * CONCURRENT
        assert engine.runner.kv_bytes() <= KV_BUDGET
        assert engine.counters["spec_steps"] > 0 and engine.speculation.mode == "fixed"
    finally:
        handle.stop()
