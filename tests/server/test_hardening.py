"""Bounded work per request and keys (issue 13), against a real loopback server over a tiny random model.

Each test names the attack it covers; each failed before the fix.
"""

from __future__ import annotations

import httpx
import pytest
from helpers.server import tiny_engine

from nbkit.server.launch import start_server

KEY = "hardening-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    handle = start_server(tiny_engine(), port=0)
    yield handle
    handle.stop(grace=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_stop_strings_are_capped_in_length(http):
    # Attack: four 20,000-character stops cost seconds of engine-thread CPU per request.
    r = http.post("/generate", json={"prompt": "x", "max_tokens": 4, "stop": ["a" * 257]})
    assert r.status_code == 422 and "at most 256" in r.json()["error"]
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stop": ["a" * 20000] * 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    ok = http.post("/generate", json={"prompt": "x", "max_tokens": 4, "stop": ["a" * 256] * 4})
    assert ok.status_code == 200


def test_chat_messages_are_capped_before_templating(http):
    # Attack: 32,000 messages (under the 1 MiB body limit) made the template path run for 24 s.
    many = [{"role": "user", "content": "<|im_start|>"}] * 2000
    r = http.post("/v1/chat/completions", json={"messages": many, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "at most" in r.text
    huge = [{"role": "user", "content": "z" * 900_000}]
    r = http.post("/v1/chat/completions", json={"messages": huge, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ok = http.post("/v1/chat/completions", json={"messages": many[:3], "max_tokens": 1})
    assert ok.status_code == 200, ok.text


UNSUPPORTED = [
    ("/v1/chat/completions", "guided_json", {"type": "object"}, None),  # vLLM's: ours is response_format
    ("/v1/chat/completions", "logit_bias", {"50256": -100}, {}),
    ("/v1/completions", "logit_bias", {"1": 5}, {}),
    ("/generate", "adapter_id", "lora-1", None),
    ("/generate", "repetition_penalty", 1.2, 1.0),
    ("/generate", "truncate", 100, None),
    ("/generate", "decoder_input_details", True, False),
    ("/generate", "no_such_option", "x", None),
]


@pytest.mark.parametrize("path,name,bad,neutral", UNSUPPORTED, ids=[f"{p}-{n}" for p, n, _, _ in UNSUPPORTED])
def test_unsupported_parameters_are_refused_by_name(http, path, name, bad, neutral):
    # Attack: extra="ignore" dropped them silently: a client asking for JSON or tools got plain text.
    def body(value):
        if path == "/generate":
            return {"inputs": "x", "parameters": {"max_new_tokens": 2, name: value}}
        if path == "/v1/completions":
            return {"prompt": "x", "max_tokens": 2, name: value}
        return {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, name: value}

    r = http.post(path, json=body(bad))
    assert r.status_code in (400, 422), r.text
    assert name in r.text
    if path.startswith("/v1"):
        assert r.json()["error"]["param"] == name
    r = http.post(path, json=body(neutral))
    assert r.status_code == 200, r.text


def test_tgi_root_route(server, http):
    plain = http.post("/", json={"inputs": "abc", "parameters": {"max_new_tokens": 5}})
    assert plain.status_code == 200 and plain.json() == http.post(
        "/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 5}}).json()
    with http.stream("POST", "/", json={"inputs": "abc", "parameters": {"max_new_tokens": 5}, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert plain.json()["generated_text"] in lines[-1]
    assert http.post("/generate", json={"inputs": "abc", "stream": True}).status_code == 422


def test_stream_usage_carries_speed_and_tokens_per_step(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        chunks = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    import json

    last = json.loads(chunks[-2])
    finish = [c["finish_reason"] for chunk in chunks[:-2] for c in json.loads(chunk)["choices"] if c["finish_reason"]]
    assert chunks[-1] == "[DONE]" and len(finish) == 1
    n = last["usage"]["completion_tokens"]
    assert n == 6 if finish[0] == "length" else 1 <= n < 6, (finish, n)
    plain = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})
    assert plain.json()["usage"]["completion_tokens"] == n  # the same greedy answer, counted the same way
    assert last["nbkit"]["steps"] >= 1 and last["nbkit"]["mean_accepted"] >= 1.0 and last["nbkit"]["tokens_per_s"] > 0


def test_tree_overrides_are_an_operator_opt_in(http):
    # Attack: "tree": "mc_sim_7b_63" padded every row of the batch to 64 positions, whatever the policy decided.
    r = http.post("/generate", json={"prompt": "x", "max_tokens": 2, "tree": "mc_sim_7b_63"})
    assert r.status_code == 422 and "tree" in r.json()["error"]
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "tree": "chain-3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tree"
    r = http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2, "tree": "mc_sim_7b_63"}})
    assert r.status_code == 422
    assert http.post("/generate", json={"prompt": "x", "max_tokens": 2, "speculate": False}).status_code == 200
    assert http.post("/generate", json={"prompt": "x", "max_tokens": 2, "tree": "none"}).status_code == 200
