"""Tool calls: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` on /v1/chat/completions.

The model writes its calls as JSON, `{"name": "<function>", "arguments": {...}}` or a list of such objects
(chat_format.py tells models whose template knows no tools to; templates that know tools ask for the same
object, often inside `<tool_call>` tags). What the request asks decides how the answer is read:
- `tool_choice: "required"` or a named function: the output is constrained to the JSON schema of a call
  (`forcing_schema`), so the arguments always parse and validate; the answer is read as calls, streamed
  as argument deltas while they are generated (`ForcedCalls`).
- `"auto"`: the model answers in text or calls; text that is a call and nothing else (`parse_calls`)
  is answered as one. Streamed, a reply that may still become a call is held back until it is decided.
- `"none"`, or no tools: text only; the tools are not shown to the model.
Calls are answered in OpenAI's `tool_calls` form with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass, field

from ..engine.request import GrammarKind, GrammarSpec
from .errors import APIError


class ToolChoice(enum.StrEnum):
    NONE = "none"  # text only
    AUTO = "auto"  # text or calls, as the model decides
    REQUIRED = "required"  # at least one call, to any function
    NAMED = "named"  # one call to the function named in tool_choice


@dataclass(frozen=True)
class ToolPlan:
    """The tools of one request and how its answer is read."""

    functions: dict[str, dict]  # name -> OpenAI function definition (name, description, parameters)
    choice: ToolChoice
    parallel: bool = True
    named: str | None = None  # ToolChoice.NAMED: the function

    @property
    def forced(self) -> bool:
        return self.choice in (ToolChoice.REQUIRED, ToolChoice.NAMED)

    @property
    def grammar(self) -> GrammarSpec | None:
        """The constraint of a forced call (None: the model writes freely)."""
        if not self.forced:
            return None
        return GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(forcing_schema(self), ensure_ascii=False))

    def read(self, text: str) -> list[Call] | None:
        """The calls in a whole answer (None: it is text)."""
        if self.forced:
            calls = [Call(c.name, c.arguments.strip()) for c in scan_calls(text)]
            return calls or None
        return parse_calls(text, self.functions)


def tool_plan(body) -> ToolPlan | None:
    """The request's ToolPlan (None when it has no tools or tool_choice is "none"); 400 on a bad choice."""
    tools = body.tools or []
    functions = {t.function.name: t.function.model_dump(exclude_none=True) for t in tools}
    choice = body.tool_choice or ("auto" if tools else "none")
    named = None if isinstance(choice, str) else choice.function.name
    if named is not None and named not in functions:
        raise APIError(None, f"tool_choice names the function {named!r}, which is not among the tools",
                       param="tool_choice")
    if choice == "required" and not tools:
        raise APIError(None, "tool_choice 'required' needs tools", param="tool_choice")
    if len(functions) != len(tools):
        raise APIError(None, "two tools have the same function name", param="tools")
    if choice == "none" or not tools:
        return None
    kind = ToolChoice.NAMED if named is not None else ToolChoice(choice)
    return ToolPlan(functions, kind, parallel=body.parallel_tool_calls, named=named)


def call_schema(function: dict) -> dict:
    """The JSON schema of one call to `function`: its name, and arguments valid against its parameters."""
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [function["name"]]},
                                             "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def forcing_schema(plan: ToolPlan) -> dict:
    """A named function: one call to it. Required: a call to any function, or with parallel calls a list of
    one or more (the order the format asks for: name first, then arguments)."""
    if plan.choice is ToolChoice.NAMED:
        return call_schema(plan.functions[plan.named])
    one = [call_schema(f) for f in plan.functions.values()]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    return {"type": "array", "items": call, "minItems": 1} if plan.parallel else call


# ---- reading calls ----------------------------------------------------------------------------------

@dataclass
class Call:
    name: str
    arguments: str  # JSON text, as the model wrote it (forced) or re-serialized (auto)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_calls(text: str, functions: dict[str, dict]) -> list[Call] | None:
    """Calls in free text: the whole answer is a call object or a list of them (in a ```json fence, or in
    `<tool_call>` tags as tool-aware templates ask), each naming a known function. Else None: it is text."""
    text = text.strip()
    blocks = [b.strip() for b in _TAGGED.findall(text)] if text.startswith("<tool_call>") else \
        [_FENCE.sub(r"\1", text)]
    calls: list[Call] = []
    for block in blocks:
        try:
            value = json.loads(block)
        except ValueError:
            return None
        for obj in value if isinstance(value, list) else [value]:
            call = _call(obj, functions)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _call(obj, functions: dict[str, dict]) -> Call | None:
    if not isinstance(obj, dict) or obj.get("name") not in functions:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))  # Llama 3.1's templates say "parameters"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict) or set(obj) - {"name", "arguments", "parameters"}:
        return None
    return Call(obj["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass
class PartialCall:
    name: str
    arguments: str  # the arguments' JSON text so far
    done: bool


_HEAD = re.compile(r'\s*,?\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def scan_calls(text: str) -> list[PartialCall]:
    """The calls in a (possibly unfinished) forced answer: `{"name": ..., "arguments": ...}` or a list of them,
    in the order the forcing schema sets. A call appears once its name is complete; its arguments grow."""
    calls: list[PartialCall] = []
    start = re.match(r"\s*\[", text)
    pos = start.end() if start else 0
    while (head := _HEAD.match(text, pos)) is not None:
        name = json.loads(head.group(1))
        end = json_value_end(text, head.end())
        if end is None:
            calls.append(PartialCall(name, text[head.end():], False))
            break
        calls.append(PartialCall(name, text[head.end():end], True))
        close = re.compile(r"\s*\}").match(text, end)
        if close is None:
            break
        pos = close.end()
    return calls


def json_value_end(text: str, start: int) -> int | None:
    """Where the JSON value that starts at `start` ends (None: not yet). Strings and nesting are followed;
    the value is assumed well formed (the grammar made it so)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
            if not in_string and depth == 0:
                return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return i + 1 if depth == 0 else i
        elif depth == 0 and ch in ", \t\r\n" and i > start:
            return i  # the end of a number, true, false or null
    return None


# ---- streaming ----------------------------------------------------------------------------------------

class ToolStream:
    """One choice's stream: text in, OpenAI deltas out (`content`, or `tool_calls` with argument fragments)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.calls: list[Call] = []
        self.sent: list[int] = []  # argument characters sent per call
        self.undecided = not plan.forced  # auto: text held back while it may still be a call

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.plan.forced:
            return self._call_deltas(scan_calls(self.text))
        if self.undecided and not _may_be_call(self.text):
            self.undecided = False
            return [{"content": self.text}]
        return [] if self.undecided else [{"content": piece}]

    def close(self) -> list[dict]:
        """The deltas still held when the answer ends."""
        if self.plan.forced:
            return [] if self.calls else [{"content": self.text}] if self.text else []
        if not self.undecided:
            return []
        calls = parse_calls(self.text, self.plan.functions)
        if calls is None:
            return [{"content": self.text}] if self.text else []
        return self._call_deltas([PartialCall(c.name, c.arguments, True) for c in calls])

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _call_deltas(self, partial: list[PartialCall]) -> list[dict]:
        deltas = []
        for index, p in enumerate(partial):
            if index == len(self.calls):  # first chunk of a call: its id, type and name
                self.calls.append(Call(p.name, ""))
                self.sent.append(0)
                deltas.append({"tool_calls": [{"index": index, **self.calls[index].openai()}]})
            arguments = p.arguments.rstrip() if p.done else p.arguments
            if len(arguments) > self.sent[index]:
                new = arguments[self.sent[index]:]
                self.sent[index] = len(arguments)
                self.calls[index].arguments += new
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": new}}]})
        return deltas


def _may_be_call(text: str) -> bool:
    """Whether a reply that begins with `text` may still turn out to be a call."""
    head = text.lstrip()
    return not head or head[0] in "{[" or head.startswith("```") or \
        head.startswith("<tool_call>") or "<tool_call>".startswith(head)


def answer(plan: ToolPlan | None, text: str, reason: str) -> tuple[str | None, list[dict] | None, str]:
    """A whole reply as OpenAI's message fields: (content, tool_calls, finish_reason)."""
    calls = plan.read(text) if plan is not None else None
    if calls is None:
        return text, None, reason
    return None, [c.openai() for c in calls], "tool_calls" if reason == "stop" else reason
