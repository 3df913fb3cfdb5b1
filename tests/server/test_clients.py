"""The clients people already have, unchanged, against a real loopback server (tiny random model).

huggingface_hub's InferenceClient speaks TGI: `text_generation` posts to the URL itself (`POST /`), and
`chat_completion` sends the model name "dummy" to `/v1/chat/completions`. The openai client covers
chat, stream and completions. Greedy answers are compared with Hugging Face `generate`.
"""

from __future__ import annotations

import openai
import pytest
from helpers.server import TINY_MODEL, reference_text, tiny_server
from huggingface_hub import InferenceClient


@pytest.fixture(scope="module")
def server():
    with tiny_server() as handle:
        yield handle


@pytest.fixture(scope="module")
def tgi(server):
    return InferenceClient(model=server.url, timeout=60)


@pytest.fixture(scope="module")
def chat(server):
    return InferenceClient(base_url=server.url + "/v1", timeout=60)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected(server, text: str, n: int, chat: bool = False) -> str:
    return reference_text(server.engine.encode(text, chat=chat), n)


def test_text_generation_plain(server, tgi):
    out = tgi.text_generation("Hello there", max_new_tokens=8)
    assert out == expected(server, "Hello there", 8)


def test_text_generation_details(server, tgi):
    out = tgi.text_generation("abc", max_new_tokens=6, details=True)
    assert out.generated_text == expected(server, "abc", 6)
    assert out.details.finish_reason in ("length", "eos_token")
    assert out.details.generated_tokens == len(out.details.tokens)
    assert "".join(t.text for t in out.details.tokens) == out.generated_text


def test_text_generation_stream(server, tgi):
    tokens = list(tgi.text_generation("stream me", max_new_tokens=10, stream=True))
    assert "".join(tokens) == expected(server, "stream me", 10)
    details = list(tgi.text_generation("stream me", max_new_tokens=10, stream=True, details=True))
    assert details[-1].generated_text == expected(server, "stream me", 10)
    assert details[-1].details.finish_reason in ("length", "eos_token")


def test_chat_completion_plain_any_model_name(server, chat):
    messages = [{"role": "user", "content": "Hi!"}]
    out = chat.chat_completion(messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == expected(server, "Hi!", 8, chat=True)
    assert out.model == TINY_MODEL  # the served name, whatever name the client sent ("dummy")


def test_chat_completion_stream(server, chat):
    messages = [{"role": "user", "content": "Hi!"}]
    chunks = list(chat.chat_completion(messages, max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(server, "Hi!", 8, chat=True)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_chat_stream_completions(server, oai):
    messages = [{"role": "user", "content": "Hi!"}]
    want = expected(server, "Hi!", 8, chat=True)
    reply = oai.chat.completions.create(model="anything", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == want and reply.model == TINY_MODEL
    stream = oai.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    done = oai.completions.create(model=TINY_MODEL, prompt="abc", max_tokens=6, temperature=0)
    assert done.choices[0].text == expected(server, "abc", 6)
