"""Every endpoint against a real server (launcher, free port) over a tiny random model.

Greedy answers are compared with Hugging Face `generate` on an identical copy of the model, so a
wrong token anywhere (HTTP layer, batching, Medusa) fails the test.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers.server import TINY_MODEL, reference_text, sse_data, tiny_engine

from nbkit.server.app import Settings
from nbkit.server.launch import start_server


@pytest.fixture(scope="module")
def server():
    # Strict model names (a setting): the 404 cases below; the lenient default is tests/server/test_clients.py.
    handle = start_server(tiny_engine(), port=0, settings=Settings(strict_model_name=True))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def encode(server, text: str, chat: bool = False) -> list[int]:
    return server.engine.encode(text, chat=chat)


def test_original_contract(server, http):
    r = http.post("/generate", json={"prompt": "Hello there"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content.startswith(b'{"response":"')
    body = r.json()
    assert body["response"] == reference_text(encode(server, "Hello there"), 50)  # max_tokens defaults to 50
    assert body["completion_tokens"] <= 50 and body["prompt_tokens"] == len(encode(server, "Hello there"))
    r = http.post("/generate", json={"prompt": "Hi", "max_tokens": 7})
    assert r.json()["response"] == reference_text(encode(server, "Hi"), 7)


def test_tgi_generate_with_details(server, http):
    r = http.post("/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 6, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == reference_text(encode(server, "abc"), 6)
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"])
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]
    full = http.post("/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 6,
                                                                      "return_full_text": True}}).json()
    assert full == {"generated_text": "abc" + body["generated_text"], "details": None}


def test_generate_stream_tgi_events(server, http):
    with http.stream("POST", "/generate_stream", json={"inputs": "stream me", "parameters": {"max_new_tokens": 12}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        events = sse_data(r)
    expected = reference_text(encode(server, "stream me"), 12)
    assert [e["index"] for e in events] == list(range(len(events)))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == expected
    assert events[-1]["generated_text"] == expected
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token")


def test_generate_stream_stop_sequence(server, http):
    full = reference_text(encode(server, "stop here"), 30)
    stop = full[10:12]
    cut = full[: full.find(stop)]
    with http.stream("POST", "/generate_stream", json={"prompt": "stop here", "max_tokens": 30, "stop": [stop]}) as r:
        events = sse_data(r)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["generated_text"] == cut
    assert "".join(e["token"]["text"] for e in events) == cut
    assert http.post("/generate", json={"prompt": "stop here", "max_tokens": 30, "stop": [stop]}).json()[
        "response"] == cut


def test_openai_completions(server, client):
    ids = encode(server, "Once upon")
    out = client.completions.create(model=TINY_MODEL, prompt="Once upon", max_tokens=9, temperature=0)
    assert out.choices[0].text == reference_text(ids, 9)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= 9
    by_ids = client.completions.create(model=TINY_MODEL, prompt=ids, max_tokens=9, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    chunks = list(client.completions.create(model=TINY_MODEL, prompt="Once upon", max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason


def test_openai_chat_applies_template_and_streams(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is up?"}]
    ids = server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
    expected = reference_text(ids, 10)
    out = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_completion_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens
    no_usage = list(client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=3,
                                                   temperature=0, stream=True))
    assert all(c.usage is None for c in no_usage) and no_usage[-1].choices[0].finish_reason is not None


def test_openai_sampling_is_seeded(server, client):
    kwargs = {"model": TINY_MODEL, "prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_models_health_info(server, http, client):
    assert [m.id for m in client.models.list().data] == [TINY_MODEL]
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b'{"status":"ok"}'
    info = http.get("/info").json()
    assert info["model_id"] == TINY_MODEL and info["heads"] == 4 and info["engine"] == "torch"
    assert info["max_total_tokens"] == server.engine.runner.max_context - 65
    assert info["max_concurrent_requests"] == 8 and info["api_key_required"] is False
    assert info["mode"] is None and info["guarantee"] is None  # numerics modes are the llama.cpp engine's
    schema = http.get("/openapi.json").json()
    for path in ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/v1/models",
                 "/health", "/info", "/metrics"):
        assert path in schema["paths"]


def test_metrics_after_traffic(server, http):
    http.post("/generate", json={"prompt": "count me", "max_tokens": 5})
    http.post("/generate", json={"prompt": 5})
    text = http.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['nbkit_requests_total{route="/generate",status="200"}'] >= 1
    assert values['nbkit_requests_total{route="/generate",status="422"}'] >= 1
    assert values["nbkit_generated_tokens_total"] >= 5
    assert values["nbkit_queue_size"] == 0 and values["nbkit_batch_size"] == 0
    assert values["nbkit_time_to_first_token_seconds_count"] >= 1
    assert values["nbkit_time_per_output_token_seconds_count"] >= 1
    assert values["nbkit_step_batch_size_count"] >= 1 and values["nbkit_spec_tree_size_count"] >= 1
    assert "nbkit_spec_proposed_tokens_total" in values and "nbkit_spec_accepted_tokens_total" in values
    assert "nbkit_spec_mean_accepted_per_step" in values
    assert any(k.startswith("nbkit_spec_tree_choices_total{") for k in values)


def test_concurrent_requests_equal_sequential(server, http):
    prompts = [("p" * n + "q", 20 + 3 * n) for n in range(1, 9)]
    sequential = [http.post("/generate", json={"prompt": p, "max_tokens": m}).json()["response"] for p, m in prompts]
    steps_before = server.engine.snapshot()["steps"]
    batch_hist = _batch_counts(http)
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(
            lambda pm: http.post("/generate", json={"prompt": pm[0], "max_tokens": pm[1]}).json()["response"],
            prompts))
    assert concurrent == sequential
    assert sequential == [reference_text(encode(server, p), m) for p, m in prompts]
    # The requests really shared steps: some step ran more than one of them.
    after = _batch_counts(http)
    assert after["le1"] - batch_hist["le1"] < after["count"] - batch_hist["count"]
    assert server.engine.snapshot()["steps"] > steps_before


def _batch_counts(http) -> dict:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('nbkit_step_batch_size_bucket{le="1.0"}'):
            out["le1"] = float(line.split()[-1])
        elif line.startswith("nbkit_step_batch_size_count"):
            out["count"] = float(line.split()[-1])
    return out


def test_chat_page_is_served(http):
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "v1/chat/completions" in r.text and "http://" not in r.text and "https://" not in r.text


# ---- bad input: the right 4xx, in the route's error style, and never a 500 ------------------------

TGI_BAD = [
    ({"prompt": 123}, 422),
    ({"prompt": None}, 422),
    ({"prompt": ""}, 422),
    ({"max_tokens": 5}, 422),  # no prompt
    ({"prompt": "x", "max_tokens": -1}, 422),
    ({"prompt": "x", "max_tokens": 0}, 422),
    ({"prompt": "x", "max_tokens": 10**9}, 422),
    ({"prompt": "x", "max_tokens": "5"}, 422),
    ({"prompt": "x", "max_tokens": 1.5}, 422),
    ({"prompt": "x", "max_tokens": True}, 422),
    ({"prompt": "x", "temperature": -1}, 422),
    ({"prompt": "x", "top_p": 0}, 422),
    ({"prompt": "x", "seed": -3}, 422),
    ({"prompt": "x", "seed": 2**70}, 422),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422),
    ({"prompt": "x", "stop": [""]}, 422),
    ({"prompt": "x", "tree": "no-such-tree"}, 422),
    ({"prompt": "y" * 2000}, 422),  # more tokens than the context allows
    ({"prompt": "y" * 900, "max_tokens": 100}, 422),  # prompt + max_tokens over the context
    ({"prompt": "x", "inputs": "x"}, 422),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422),
    ({"inputs": "x", "parameters": "fast"}, 422),
    ([1, 2, 3], 422),
]


@pytest.mark.parametrize("body,status", TGI_BAD, ids=[json.dumps(b)[:40] for b, _ in TGI_BAD])
def test_bad_generate_requests(http, body, status):
    for path in ("/generate", "/generate_stream"):
        r = http.post(path, json=body)
        assert r.status_code == status, (path, r.text)
        err = r.json()
        assert set(err) == {"error", "error_type"} and err["error_type"] == "validation" and err["error"]


OPENAI_BAD = [
    ("/v1/completions", {"model": TINY_MODEL, "prompt": 3}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": ""}, 400),
    ("/v1/completions", {"model": TINY_MODEL}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": ["a", 5]}, 400),  # a list of prompts is one kind
    ("/v1/completions", {"model": TINY_MODEL, "prompt": []}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": ["a", ""]}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": [1, 99999]}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "temperature": 3}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "n": 17}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "logprobs": 21}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "logprobs": -1}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "presence_penalty": 0.5}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "x", "stop": ["1", "2", "3", "4", "5"]}, 400),
    ("/v1/completions", {"model": TINY_MODEL, "prompt": "z" * 3000}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}],
                              "stream": "yes"}, 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 3}, 400),  # OpenAI's rule: top_logprobs needs logprobs: true
    ("/v1/chat/completions", {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 21}, 400),
]


@pytest.mark.parametrize("path,body,status", OPENAI_BAD, ids=[f"{p[4:]}-{json.dumps(b)[:50]}" for p, b, _ in OPENAI_BAD])
def test_bad_openai_requests(http, path, body, status):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 404:
        assert err["code"] == "model_not_found"


@pytest.mark.parametrize("path,status", [("/generate", 422), ("/generate_stream", 422), ("/v1/completions", 400),
                                         ("/v1/chat/completions", 400)])
def test_invalid_json_and_wrong_content(http, path, status):
    for content, headers in ((b'{"prompt": "x"', {"content-type": "application/json"}),
                             (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}),
                             (b"\xff\xfe\x00", {"content-type": "application/json"}),
                             (b"", {})):
        r = http.post(path, content=content, headers=headers)
        assert r.status_code == status, (content, r.text)
        assert "error" in r.json()


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY_MODEL, prompt="x", max_tokens=10**9)


def test_unknown_route_and_method(http):
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = http.get("/generate")
    assert r.status_code == 405 and "error" in r.json()
    r = http.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_server_still_serves_after_bad_input(server, http):
    r = http.post("/generate", json={"prompt": "after", "max_tokens": 4})
    assert r.json()["response"] == reference_text(encode(server, "after"), 4)
