"""JSON schemas the grammar engine enforces, and a 400 naming the keyword it would not.

xgrammar compiles a schema with keywords it does not implement (allOf, uniqueItems, if/then, ...) by ignoring
them, so an answer could break the schema the client sent. Every keyword is checked here against the ones it
enforces (each tried against a text that breaks it: docs/measurements.md, "Grammar engines"); annotations that
constrain nothing are accepted.
"""

from __future__ import annotations

ENFORCED = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "minProperties", "maxProperties",
    "propertyNames", "items", "prefixItems", "minItems", "maxItems", "anyOf", "oneOf", "$ref", "$defs",
    "definitions", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf",
})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$anchor", "contentMediaType", "contentEncoding"})
FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "uuid", "uri", "uri-reference", "ipv4",
                     "ipv6", "hostname"})
# keyword -> how its value holds sub-schemas
_ONE, _MAP, _LIST = "schema", "map", "list"
SUBSCHEMAS = {"properties": _MAP, "$defs": _MAP, "definitions": _MAP, "items": _ONE, "additionalProperties": _ONE,
              "propertyNames": _ONE, "prefixItems": _LIST, "anyOf": _LIST, "oneOf": _LIST}


def check_schema(schema, where: str = "#") -> None:
    """Raise ValueError naming the first keyword (and where it is) that the grammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"the JSON schema at {where} must be an object or a boolean")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise ValueError(f"the JSON schema keyword '{key}' (at {where}) is not supported: structured output "
                             f"supports {', '.join(sorted(ENFORCED))}")
        if key == "format" and value not in FORMATS:
            raise ValueError(f"the string format {value!r} (at {where}) is not supported: use one of "
                             f"{', '.join(sorted(FORMATS))}")
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise ValueError(f"the $ref {value!r} (at {where}) is not supported: only references inside the "
                             "schema ('#/$defs/...') are")
        _check_children(key, value, f"{where}/{key}")


def _check_children(key: str, value, where: str) -> None:
    kind = SUBSCHEMAS.get(key)
    if kind == _ONE:
        check_schema(value, where)
    elif kind == _MAP:
        if not isinstance(value, dict):
            raise ValueError(f"'{key}' (at {where}) must be an object of schemas")
        for name, sub in value.items():
            check_schema(sub, f"{where}/{name}")
    elif kind == _LIST:
        if not isinstance(value, list):
            raise ValueError(f"'{key}' (at {where}) must be a list of schemas")
        for i, sub in enumerate(value):
            check_schema(sub, f"{where}/{i}")
