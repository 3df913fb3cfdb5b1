"""Structured output from each API's own field to the engine's GrammarSpec, compiled off the event loop.

OpenAI: `response_format` `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}`; TGI: `parameters.grammar` `{"type": "json", "value": schema}` or `{"type": "regex",
"value": pattern}` (huggingface_hub's `text_generation(grammar=...)`); the original `/generate`: `json_schema`
or `regex`. A bad schema or regex, or a schema keyword the grammar would not enforce, answers 400 naming it.
"""

from __future__ import annotations

import json

from ..engine.request import GrammarKind, GrammarSpec
from .errors import APIError
from .schemas import ResponseFormat, TGIGrammar


def _schema_text(schema, param: str) -> str:
    """A schema as compact JSON text (the compile cache's key). Key order is kept: the answer's properties come
    in the schema's order, as OpenAI's structured outputs give them."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise APIError(400, f"the JSON schema is not valid JSON: {err}", param=param) from None
    if not isinstance(schema, dict | bool):
        raise APIError(400, "the JSON schema must be an object", param=param)
    return json.dumps(schema, separators=(",", ":"))


def openai_grammar(fmt: ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec(GrammarKind.JSON_OBJECT)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return GrammarSpec(GrammarKind.JSON_SCHEMA, _schema_text(fmt.json_schema.schema_, "response_format"))


def tgi_grammar(grammar: TGIGrammar | None) -> GrammarSpec | None:
    if grammar is None:
        return None
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise APIError(400, "a regex grammar's value must be a string", param="grammar")
        return GrammarSpec(GrammarKind.REGEX, grammar.value)
    return GrammarSpec(GrammarKind.JSON_SCHEMA, _schema_text(grammar.value, "grammar"))


def generate_grammar(json_schema, regex: str | None) -> GrammarSpec | None:
    if json_schema is not None and regex is not None:
        raise APIError(400, "send json_schema or regex, not both", param="json_schema")
    if regex is not None:
        return GrammarSpec(GrammarKind.REGEX, regex)
    if json_schema is not None:
        return GrammarSpec(GrammarKind.JSON_SCHEMA, _schema_text(json_schema, "json_schema"))
    return None

