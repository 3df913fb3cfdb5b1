"""Tool calls on real models, both engines, with the official openai client: the embedded SmolLM2 (its template
knows no tools: the plain-text format) and the vicuna miniature (no template: vicuna v1.1 with the same format).

- a forced call (a named function; `required`) parses and its arguments validate against the function's schema;
- the round trip (call -> tool result -> answer) completes, the history rendered as chat_format renders it;
- the streamed call's argument deltas join into valid JSON, equal to the same greedy call answered whole.
Two tests per model and engine: each forced call costs seconds on the embedded model.

Forced calls are constrained decoding (SamplingParams.grammar): Medusa trees run under the grammar here.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import jsonschema
import openai
import pytest

from nbkit.chat_format import chat_prompt_ids, tool_messages
from nbkit.engine.loader import load_engine
from nbkit.engine.speculation import CostModel
from nbkit.server.launch import start_server

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

pytestmark = pytest.mark.slow

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Get the time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
                       "required": ["zone"], "additionalProperties": False}}
FUNCTIONS = {f["name"]: f for f in (WEATHER, TIME)}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX = 96
CHEAP = CostModel.from_function(lambda n: 0.01)  # the adaptive policy: trees always pay, so they run


def _engine(name: str, kind: str, mirror):
    if kind == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")
    if name == "embedded":
        return load_engine(kind, None, max_batch=2, cost_model=CHEAP)
    from vicuna_mini import BASE_ID, HEADS_ID

    from nbkit.notebook import hub

    prepared = hub.prepare(BASE_ID, HEADS_ID, SimpleNamespace(engine=kind, quantization="q8_0"), mirror=mirror)
    return load_engine(kind, prepared.model, heads=prepared.heads, max_batch=2, cost_model=CHEAP)


@pytest.fixture(scope="module", params=[("embedded", "torch"), ("embedded", "llamacpp"), ("vicuna", "torch"),
                                        ("vicuna", "llamacpp")], ids=lambda p: "-".join(p))
def served(request, vicuna_mirror, one_torch_thread):
    name, kind = request.param
    handle = start_server(_engine(name, kind, vicuna_mirror if name == "vicuna" else None), port=0)
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    yield SimpleNamespace(name=name, kind=kind, engine=handle.engine, oai=client)
    handle.stop()


def create(served, **kwargs):
    return served.oai.chat.completions.create(model="m", tools=TOOLS, max_tokens=MAX, temperature=0, **kwargs)


def valid_calls(calls) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, each validated against its function's parameters."""
    out = []
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, FUNCTIONS[call.function.name]["parameters"])
        out.append((call.function.name, arguments))
    return out


def test_a_named_call_parses_and_validates_and_the_round_trip_completes(served):
    messages = list(ASK)
    first = create(served, messages=messages, tool_choice=NAMED)
    out = first.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None, out
    assert [name for name, _ in valid_calls(out.message.tool_calls)] == ["get_weather"]
    (call,) = out.message.tool_calls
    messages.append(out.message)  # the client's own object, sent back as it is
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'})
    final = served.oai.chat.completions.create(model="m", tools=TOOLS, messages=messages, tool_choice="none",
                                               max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    rendered = chat_prompt_ids(served.engine.tokenizer, tool_messages(history, []))
    assert final.usage.prompt_tokens == len(rendered)  # the call and its result are in the prompt


def test_a_required_call_parses_and_its_streamed_argument_deltas_join_into_valid_json(served):
    whole = create(served, messages=ASK, tool_choice="required", parallel_tool_calls=False)
    assert whole.choices[0].finish_reason == "tool_calls" and len(valid_calls(whole.choices[0].message.tool_calls)) == 1
    stream = create(served, messages=ASK, tool_choice="required", parallel_tool_calls=False, stream=True)
    name, arguments, fragments, finish = None, "", 0, None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            name = name or delta.function.name
            arguments += delta.function.arguments or ""
            fragments += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and fragments > 2  # streamed as it was generated, not in one piece
    jsonschema.validate(json.loads(arguments), FUNCTIONS[name]["parameters"])
    (want,) = whole.choices[0].message.tool_calls  # greedy: the same call as answered whole
    assert (name, json.loads(arguments)) == (want.function.name, json.loads(want.function.arguments))
