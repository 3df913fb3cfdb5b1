"""Tool calls through the server with the official openai client, on a scripted engine: what reaches the engine
(the prompt, the GrammarSpec of a forced call) and what the client gets back (tool_calls, argument deltas,
finish_reason "tool_calls"). The model-side check, on real models and both engines, is test_tool_calls_models.py.

The engine is the tiny one with `submit` replaced: it records the request and answers a scripted text.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import openai
import pytest
from helpers.server import tiny_server

from nbkit.chat_format import chat_prompt_ids, tool_messages
from nbkit.engine.request import Finished, FinishReason, GrammarKind, RequestHandle, TokenEvent
from nbkit.server.tools import ToolChoice, ToolPlan, forcing_schema

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


@pytest.fixture(scope="module")
def server():
    with tiny_server() as handle:
        yield handle


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def script(server, monkeypatch):
    """`script.text = ...` sets what the engine answers; `script.seen` holds (prompt_ids, params) per request."""
    class Script:
        text = CALL
        seen: list = []
        ids = itertools.count(10_000)

    def submit(prompt_ids, params):
        Script.seen.append((list(prompt_ids), params))
        handle = RequestHandle(next(Script.ids), asyncio.get_running_loop())
        pieces = [Script.text[i:i + 3] for i in range(0, len(Script.text), 3)]  # a few characters a token
        for i, piece in enumerate(pieces):
            handle.push(TokenEvent(5, piece, i))
        handle.push(Finished(Script.text, [5] * len(pieces), FinishReason.EOS_TOKEN, len(prompt_ids), len(pieces),
                             len(pieces), 0.01, 0.02))
        return handle

    Script.seen = []
    monkeypatch.setattr(server.engine, "submit", submit)
    return Script


def test_a_named_function_is_forced_by_its_schema_and_answered_as_a_call(oai, script):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=40)
    grammar = script.seen[0][1].grammar
    assert grammar.kind is GrammarKind.JSON_SCHEMA
    want = forcing_schema(ToolPlan({"get_weather": WEATHER, "get_time": TIME}, ToolChoice.NAMED, named="get_weather"))
    assert json.loads(grammar.value) == want
    out = reply.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    (call,) = out.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("parallel, kind", [(True, "array"), (False, None)])
def test_required_asks_for_any_function_and_a_list_with_parallel_calls(oai, script, parallel, kind):
    script.text = f"[{CALL}]" if parallel else CALL
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=parallel, max_tokens=40)
    schema = json.loads(script.seen[0][1].grammar.value)
    assert schema.get("type") == kind and "anyOf" in (schema["items"] if parallel else schema)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_streamed_argument_deltas_join_into_the_arguments(oai, script):
    script.text = f'[{CALL}, {{"name": "get_time", "arguments": {{"zone": "UTC"}}}}]'
    chunks = list(oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=60, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if c.index not in calls:  # the first chunk of a call carries its id, type and name
                assert c.id and c.type == "function" and c.function.name
                calls[c.index] = {"name": c.function.name, "arguments": ""}
            calls[c.index]["arguments"] += c.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]
    deltas = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls)
    assert deltas > 4  # streamed in fragments, not in one piece
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)


def test_auto_answers_text_or_a_call_without_a_grammar(oai, script):
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=40)
    assert script.seen[0][1].grammar is None
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    script.text = "It is sunny."
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=40)
    assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=40, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "It is sunny."


def test_none_hides_the_tools_and_reads_text(server, oai, script):
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=40)
    assert reply.choices[0].message.content == CALL and reply.choices[0].finish_reason == "stop"
    assert script.seen[0][1].grammar is None
    assert script.seen[0][0] == chat_prompt_ids(server.engine.tokenizer, ASK)


def test_the_round_trip_sends_calls_and_results_back_as_history(server, oai, script):
    """call -> tool result -> answer, as the openai client's users write it (the reply's message appended)."""
    messages = list(ASK)
    first = oai.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=40)
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message)  # a pydantic object: the client serializes it
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 7})})
    script.text = "It is 7 degrees in Oslo."
    final = oai.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=40)
    assert final.choices[0].message.content == "It is 7 degrees in Oslo."
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 7}'}]
    converted = tool_messages(history, [WEATHER, TIME])
    assert converted[-1] == {"role": "user", "content": 'Function get_weather returned: {"celsius": 7}'}
    assert script.seen[1][0] == chat_prompt_ids(server.engine.tokenizer, converted)


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
])
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
