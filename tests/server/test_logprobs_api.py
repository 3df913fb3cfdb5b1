"""Log-probabilities through the clients people have, on the embedded SmolLM2 (torch engine): the openai client's
chat (`logprobs`, `top_logprobs`) and completions (`logprobs`), streamed and not, and huggingface_hub's
InferenceClient (`details=True`, `top_n_tokens`). With and without speculation the numbers agree (float32).
"""

from __future__ import annotations

import openai
import pytest
from helpers.server import embedded_engine
from huggingface_hub import InferenceClient

from nbkit.server.app import Settings
from nbkit.server.launch import start_server

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "List the first ten prime numbers."}]
PROMPT = "The capital of France is"
N = 12
ATOL = 1e-4  # float32: two computation paths of one logit differ by rounding only
SPEC = {"tree": "mc_sim_7b_63"}
PLAIN = {"speculate": False}


@pytest.fixture(scope="module")
def server():
    for engine in embedded_engine():
        handle = start_server(engine, port=0, settings=Settings(allow_client_trees=True))  # tests pick trees
        yield handle
        handle.stop(grace=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(oai, extra, stream=False, top=5):
    return oai.chat.completions.create(model="m", messages=CHAT, max_tokens=N, temperature=0, logprobs=True,
                                       top_logprobs=top, stream=stream, extra_body=extra,
                                       stream_options={"include_usage": True} if stream else None)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= ATOL for x, y in zip(a, b))


def test_chat_top_logprobs_five_per_token_greedy_first_same_with_speculation(oai):
    plain, spec = chat(oai, PLAIN).choices[0], chat(oai, SPEC).choices[0]
    assert plain.message.content == spec.message.content
    for choice in (plain, spec):
        content = choice.logprobs.content
        assert len(content) == N and "".join(t.token for t in content) == choice.message.content
        for t in content:
            assert len(t.top_logprobs) == 5 and t.top_logprobs[0].token == t.token
            assert t.top_logprobs[0].logprob == t.logprob and t.bytes == list(t.token.encode())
            assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    assert close([t.logprob for t in plain.logprobs.content], [t.logprob for t in spec.logprobs.content])
    for a, b in zip(plain.logprobs.content, spec.logprobs.content):
        assert [x.token for x in a.top_logprobs] == [x.token for x in b.top_logprobs]
        assert close([x.logprob for x in a.top_logprobs], [x.logprob for x in b.top_logprobs])


def test_chat_stream_carries_the_same_logprobs(oai):
    whole = chat(oai, SPEC).choices[0].logprobs.content
    chunks = list(chat(oai, SPEC, stream=True))
    assert chunks[-1].model_extra["nbkit"]["mean_accepted"] > 1.2  # the rows came from accepted tree paths
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert close([t.logprob for t in streamed], [t.logprob for t in whole])
    assert all(len(t.top_logprobs) == 5 for t in streamed)
    none = list(oai.chat.completions.create(model="m", messages=CHAT, max_tokens=3, stream=True))
    assert all(c.choices[0].logprobs is None for c in none)  # not asked: not sent


def test_completions_logprobs_streamed_and_not(oai):
    def ask(extra, stream=False):
        return oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=3,
                                      stream=stream, extra_body=extra)

    whole, spec = ask(PLAIN).choices[0], ask(SPEC).choices[0]
    lp = whole.logprobs
    assert "".join(lp.tokens) == whole.text and len(lp.tokens) == N
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(N)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value == max(top.values()) and len(top) <= 4  # 3 and the chosen one, as OpenAI
    assert spec.text == whole.text and close(spec.logprobs.token_logprobs, lp.token_logprobs)
    parts = [c.choices[0].logprobs for c in ask(SPEC, stream=True) if c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    assert close([v for p in parts for v in p.token_logprobs], lp.token_logprobs)


def test_tgi_details_and_top_n_tokens(server, oai):
    tgi = InferenceClient(model=server.url, timeout=120)
    out = tgi.text_generation(PROMPT, max_new_tokens=N, details=True, top_n_tokens=5)
    tokens = out.details.tokens
    assert "".join(t.text for t in tokens) == out.generated_text and len(out.details.top_tokens) == N
    for t, top in zip(tokens, out.details.top_tokens):
        assert len(top) == 5 and top[0]["id"] == t.id and top[0]["logprob"] == t.logprob
    plain = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=0,
                                   extra_body=PLAIN).choices[0].logprobs
    assert close([t.logprob for t in tokens], plain.token_logprobs)  # the server's default speculation vs none
    streamed = list(tgi.text_generation(PROMPT, max_new_tokens=N, details=True, top_n_tokens=5, stream=True))
    assert [e.token.id for e in streamed] == [t.id for t in tokens]
    assert close([e.token.logprob for e in streamed], [t.logprob for t in tokens])
    assert all(len(e.top_tokens) == 5 and e.top_tokens[0].id == e.token.id for e in streamed)
    plain_stream = list(tgi.text_generation(PROMPT, max_new_tokens=3, stream=True, details=True))
    assert all(e.token.logprob is not None and e.top_tokens is None for e in plain_stream)
    with pytest.raises(Exception, match="decoder_input_details"):
        tgi.text_generation(PROMPT, max_new_tokens=2, details=True, decoder_input_details=True)
