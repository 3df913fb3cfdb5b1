"""Structured output through the clients people have, on both engines, for the embedded SmolLM2 and the vicuna
miniature (sentencepiece, BOS, no chat template) served under its hub ids:

- openai's strict json_schema (nested object, enum, array) answers JSON valid against the schema, and the
  greedy answers with a Medusa tree and with speculation off are equal;
- huggingface_hub's `text_generation(grammar=...)` obeys a JSON and a regex grammar;
- /generate's json_schema and regex; a bad schema or regex, or an unsupported keyword, answers 400 naming it.
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
from huggingface_hub import InferenceClient
from vicuna_mini import BASE_ID, HEADS_ID

from nbkit.engine.loader import load_engine
from nbkit.engine.speculation import CostModel
from nbkit.notebook import hub
from nbkit.server.launch import start_server
from nbkit.server.service import Settings

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "size": {"enum": ["small", "medium", "large"]},  # not in alphabetical order: answers keep the schema's
        "city": {"type": "string", "maxLength": 16},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 2},
        "where": {"type": "object", "properties": {"country": {"type": "string", "maxLength": 12},
                                                   "coastal": {"type": "boolean"}},
                  "required": ["country", "coastal"], "additionalProperties": False},
    },
    "required": ["size", "city", "tags", "where"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [0-9]{1,3} (cats|dogs)"
CHEAP = CostModel.from_function(lambda n: 0.01)


def _engine(name: str, mirror):
    model, kind = name.split("-")
    if kind == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")
    if model == "embedded":
        return load_engine(kind, None, heads="embedded", max_batch=2, cost_model=CHEAP)
    prepared = hub.prepare(BASE_ID, HEADS_ID, SimpleNamespace(engine=kind, quantization="q8_0"), mirror=mirror)
    return load_engine(kind, prepared.model, heads=prepared.heads, max_batch=2, cost_model=CHEAP)


@pytest.fixture(scope="module", params=["embedded-torch", "embedded-llamacpp", "vicuna-torch", "vicuna-llamacpp"])
def served(request, vicuna_mirror, one_torch_thread):
    handle = start_server(_engine(request.param, vicuna_mirror), port=0, settings=Settings(allow_client_trees=True))
    with httpx.Client(base_url=handle.url, timeout=300) as http:
        yield SimpleNamespace(url=handle.url, http=http, name=request.param,
                              oai=openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0),
                              tgi=InferenceClient(model=handle.url, timeout=300))
    handle.stop()


def test_openai_strict_json_schema_with_and_without_speculation(served):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe Lisbon as JSON."}]
    answers = {}
    for tree in ("none", "mc_sim_7b_63"):
        out = served.oai.chat.completions.create(model="any", messages=messages, max_tokens=160, temperature=0,
                                                 response_format=fmt, extra_body={"tree": tree})
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        answers[tree] = out.choices[0].message.content
        answer = json.loads(answers[tree])
        jsonschema.validate(answer, SCHEMA)
        assert list(answer) == list(SCHEMA["properties"])  # OpenAI's order: the schema's
        assert list(answer["where"]) == list(SCHEMA["properties"]["where"]["properties"])
    assert answers["none"] == answers["mc_sim_7b_63"]


def test_openai_json_object_and_completions(served):
    out = served.oai.completions.create(model="any", prompt="A JSON object:", max_tokens=40, temperature=0,
                                        extra_body={"response_format": {"type": "json_object"}})
    text = out.choices[0].text
    assert text.startswith("{") and (out.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_text_generation_with_json_and_regex_grammars(served):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "boolean"}},
              "required": ["answer", "n"], "additionalProperties": False}
    text = served.tgi.text_generation("Is the sky blue?", max_new_tokens=30,
                                      grammar={"type": "json", "value": schema})
    jsonschema.validate(json.loads(text), schema)
    text = served.tgi.text_generation("Do you like pets?", max_new_tokens=20, grammar={"type": "regex", "value": REGEX})
    assert re.fullmatch(REGEX, text), text
    streamed = "".join(served.tgi.text_generation("Do you like pets?", max_new_tokens=20, stream=True,
                                                  grammar={"type": "regex", "value": REGEX}))
    assert streamed == text


def test_generate_fields_and_errors_name_the_problem(served):
    r = served.http.post("/generate", json={"prompt": "Pets?", "max_tokens": 20, "regex": REGEX})
    assert r.status_code == 200 and re.fullmatch(REGEX, r.json()["response"])
    if served.name != "embedded-torch":
        return  # the error paths do not depend on the model
    bad = [("/generate", {"prompt": "x", "regex": "[a-"}, "regex"),
           ("/generate", {"prompt": "x", "json_schema": {"type": "object", "allOf": []}}, "allOf"),
           ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{bad"}}}, "JSON"),
           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format":
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "string",
                                                                            "format": "credit-card"}}}},
            "credit-card")]
    for path, body, problem in bad:
        r = served.http.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert problem in r.text, r.text
