"""Prefix reuse and n choices through the server: the official openai client gets n choices (streamed too, each
chunk with its index), usage counts the prompt once and reports the reused tokens, /metrics and /info show the
prefix cache's counters, and a server started without it prefills everything."""

from __future__ import annotations

import httpx
import openai
import pytest
from helpers.server import reference_text, tiny_engine, tiny_server

from nbkit.server.launch import start_server

KEY = "prefix-key-0123456789abcdef"
PROMPT = "The quick brown fox jumps over the lazy dog, then"


@pytest.fixture(scope="module")
def server():
    with tiny_server(api_key=KEY) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_n_greedy_choices_share_the_prompt_and_count_it_once(server, client):
    ids = server.engine.encode(PROMPT)
    out = client.completions.create(model="x", prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [reference_text(ids, 8)] * 3
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 3 * 8
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, n=3)
    assert len({c.message.content for c in chat.choices}) == 1 and [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.usage.completion_tokens == 15 and chat.usage.prompt_tokens < 15


def test_seeded_choices_differ_and_each_is_reproducible(client):
    def ask():
        out = client.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, n=3)
        return [c.text for c in out.choices]

    first = ask()
    assert ask() == first and len(set(first)) == 3  # choice i draws with seed 7 + i
    one = client.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=8)
    assert one.choices[0].text == first[1]


def test_streamed_choices_carry_their_index(client):
    texts = {0: "", 1: "", 2: ""}
    usage = None
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                            temperature=0, n=3, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    plain = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                           temperature=0)
    assert list(texts.values()) == [plain.choices[0].message.content] * 3
    assert usage.completion_tokens == 18 and usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_shared_prefix_reports_cached_tokens_in_usage_metrics_and_info(server, client):
    ids = [7, 8, 9] + server.engine.encode("A long shared system prompt, the same for both requests.")
    first = client.completions.create(model="x", prompt=ids + [20, 21], max_tokens=8, temperature=0)
    second = client.completions.create(model="x", prompt=ids + [30, 31], max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and cached == len(ids)
    headers = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(server.url + "/info", headers=headers).json()["prefix_cache"]
    assert info["enabled"] and info["cached_tokens"] >= cached and info["hits"] >= 1 and 0 < info["hit_rate"] < 1
    metrics = httpx.get(server.url + "/metrics", headers=headers).text
    line = next(m for m in metrics.splitlines() if m.startswith("nbkit_prefix_cached_tokens_total"))
    assert float(line.split()[-1]) == info["cached_tokens"]
    assert "nbkit_prefix_evictions_total" in metrics and "nbkit_prefix_hit_rate" in metrics


def test_n_out_of_range_is_refused(server):
    for n in (0, 17):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": n},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_without_the_prefix_cache_nothing_is_reused():
    engine = tiny_engine()
    engine.prefix.enabled = False  # what --no-prefix-cache gives (Engine(prefix_cache=False))
    with start_server(engine, port=0, api_key=KEY) as handle:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key=KEY, max_retries=0)
        outs = [client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=0) for _ in range(2)]
        assert [o.usage.prompt_tokens_details.cached_tokens for o in outs] == [0, 0]
        info = httpx.get(handle.url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()["prefix_cache"]
        assert info["enabled"] is False and info["cached_tokens"] == 0
