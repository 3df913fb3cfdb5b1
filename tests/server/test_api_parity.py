"""The details clients and browsers trip on, answered as llama-server and vLLM answer them (issue 23):
/tokenize and /detokenize, CORS, the unprefixed OpenAI routes, system_fingerprint, X-Api-Key, a list of
prompts on /v1/completions, and context overflow errors that name the prompt's tokens and the limit.

Each test failed on the code before: the routes were 404, preflights 401, X-Api-Key 401, lists of prompts 400.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from helpers.server import reference_text, sse_data, tiny_server

from nbkit.server.app import Settings, create_app
from nbkit.server.cli import cors_origins

KEY = "parity-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://notebook.example"


@pytest.fixture(scope="module")
def server():
    with tiny_server(api_key=KEY) as handle:
        yield handle


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        yield client


def ids(server, text: str) -> list[int]:
    return server.engine.encode(text)


# ---- /tokenize, /detokenize --------------------------------------------------------------------

def test_tokenize_and_detokenize_in_llama_server_and_vllm_shapes(server, http):
    tok = server.engine.tokenizer
    r = http.post("/tokenize", json={"content": "Hello"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tok("Hello", add_special_tokens=False)["input_ids"]
    assert r.json()["count"] == 5
    r = http.post("/tokenize", json={"prompt": "Hello"})  # vLLM's field
    assert r.json()["tokens"] == tok("Hello")["input_ids"]
    r = http.post("/detokenize", json={"tokens": ids(server, "Hello")})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == r.json()["prompt"] == tok.decode(ids(server, "Hello"))


@pytest.mark.parametrize("path,body,param", [
    ("/detokenize", {"tokens": "1 2 3"}, "tokens"),  # not a list
    ("/detokenize", {"tokens": [1, 2, 256]}, "tokens"),  # out of the vocabulary (256 ids)
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [2] * 5000}, "tokens"),  # longer than the context
    ("/detokenize", {"tokens": [1.5]}, "tokens"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": "a", "prompt": "b"}, "content"),
    ("/tokenize", {"content": "a", "add_special": True, "add_special_tokens": False}, "add_special"),
])
def test_bad_tokenizer_input_is_a_4xx_json_error(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_routes_need_the_key(server):
    for path, body in (("/tokenize", {"content": "Hi"}), ("/detokenize", {"tokens": [5]})):
        assert httpx.post(server.url + path, json=body).status_code == 401


# ---- keys: X-Api-Key beside Bearer ---------------------------------------------------------------

def test_x_api_key_is_accepted_everywhere_a_key_is_checked(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"X-Api-Key": KEY}) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert client.post("/tokenize", json={"content": "Hi"}).status_code == 200
    wrong = httpx.get(server.url + "/v1/models", headers={"X-Api-Key": KEY[:-1] + "X"})
    assert wrong.status_code == 401 and "X-Api-Key" in wrong.json()["error"]["message"]


# ---- CORS ------------------------------------------------------------------------------------------

def test_preflight_is_answered_without_a_key_and_answers_carry_cors_headers(server, http):
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] in ("*", ORIGIN)
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    refused = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})  # readable by the page: a 401
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"


def test_allowed_origins_are_configurable():
    assert cors_origins(None) == ["*"] and cors_origins(["none"]) == []
    assert cors_origins(["https://a.example/"]) == ["https://a.example"]
    # (an app without an engine: launching a second server would stop the module's one)
    with TestClient(create_app(None, Settings(cors_origins=[ORIGIN]))) as client:
        ask = {"Access-Control-Request-Method": "POST"}
        good = client.options("/v1/models", headers={"Origin": ORIGIN, **ask})
        assert good.status_code == 200 and good.headers["access-control-allow-origin"] == ORIGIN
        other = client.options("/v1/models", headers={"Origin": "https://evil.example", **ask})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(None, Settings(cors_origins=[]))) as client:
        r = client.get("/health", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in r.headers


# ---- the OpenAI routes without /v1, system_fingerprint ---------------------------------------------

def test_openai_routes_without_the_v1_prefix(server):
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.app.state.service.model_id]
    out = client.completions.create(model="x", prompt="Hello there", max_tokens=6, temperature=0)
    assert out.choices[0].text == reference_text(ids(server, "Hello there"), 6)
    assert out.system_fingerprint and out.system_fingerprint.startswith("fp_nbkit")
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.choices[0].message.content and chat.system_fingerprint == out.system_fingerprint
    bad = httpx.post(server.url + "/completions", json={"prompt": "x", "n": 17}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"  # OpenAI-style errors there too


def test_stream_chunks_carry_the_fingerprint(server, http):
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 3, "stream": True}) as r:
        chunks = [c for c in sse_data(r) if isinstance(c, dict)]
    assert chunks and all(c["system_fingerprint"].startswith("fp_nbkit") for c in chunks)


# ---- a list of prompts on /v1/completions --------------------------------------------------------

PROMPTS = ["Hello there", "abc", "The quick brown fox"]


def test_a_list_of_prompts_gives_one_choice_each(server, http):
    want = [reference_text(ids(server, p), 5) for p in PROMPTS]
    r = http.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == want
    assert body["usage"]["prompt_tokens"] == sum(len(ids(server, p)) for p in PROMPTS)
    r = http.post("/v1/completions", json={"prompt": [ids(server, p) for p in PROMPTS], "max_tokens": 5,
                                           "temperature": 0})
    assert [c["text"] for c in r.json()["choices"]] == want  # token-id lists too


def test_a_list_of_prompts_streams_with_indexes(server, http):
    want = [reference_text(ids(server, p), 5) for p in PROMPTS]
    body = {"prompt": PROMPTS, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = sse_data(r)
    texts, finished = ["", "", ""], set()
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                finished.add(c["index"])
    assert texts == want and finished == {0, 1, 2} and events[-1] == "[DONE]"
    assert events[-2]["usage"]["prompt_tokens"] == sum(len(ids(server, p)) for p in PROMPTS)


def test_too_many_prompts_are_refused(http):
    r = http.post("/v1/completions", json={"prompt": ["a"] * 17, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# ---- context overflow ------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a" * 1100}),
    ("/completions", {"prompt": "a" * 1100}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 1100}]}),
    ("/generate", {"prompt": "a" * 1100}),
    ("/generate", {"inputs": "a" * 1100}),
])
def test_context_overflow_names_the_prompt_tokens_and_the_limit(server, http, path, body):
    total = server.engine.limits().max_total_tokens
    r = http.post(path, json=body)
    assert r.status_code in (400, 422), r.text
    err = r.json()["error"]
    message = err["message"] if isinstance(err, dict) else err
    n_prompt = len(server.engine.encode("a" * 1100, chat="messages" in body))
    assert str(n_prompt) in message and str(total) in message, message
    if isinstance(err, dict):
        assert err["code"] == "context_length_exceeded"
