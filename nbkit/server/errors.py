"""Errors as JSON, in the style of the API a route belongs to.

TGI routes answer `{"error": "...", "error_type": "..."}` (validation errors are 422);
OpenAI routes (`/v1/...`) answer `{"error": {"message", "type", "param", "code"}}` (validation errors are 400).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# error kind -> the OpenAI "type" field
OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "not_found": "invalid_request_error",
    "authentication": "authentication_error",
    "rate_limit": "rate_limit_error",
    "overloaded": "overloaded_error",
    "unavailable": "service_unavailable_error",
    "generation": "server_error",
    "internal": "server_error",
    "timeout": "timeout_error",
}


class APIError(Exception):
    """A request that cannot be served; rendered by `error_response` in the route's style."""

    def __init__(self, status: int | None, message: str, kind: str = "validation", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers


# Routes that answer OpenAI-style errors besides /v1/...: the unprefixed aliases llama-server also serves, and
# its tokenizer routes (llama-server answers their errors in the same shape).
OPENAI_PATHS = frozenset({"/chat/completions", "/completions", "/models", "/tokenize", "/detokenize"})


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in OPENAI_PATHS


def error_response(path: str, err: APIError) -> JSONResponse:
    openai = is_openai(path)
    status = err.status if err.status is not None else (400 if openai else 422)
    if openai:
        body = {"error": {"message": err.message, "type": OPENAI_TYPES.get(err.kind, err.kind),
                          "param": err.param, "code": err.code}}
    else:
        body = {"error": err.message, "error_type": err.kind}
    return JSONResponse(body, status_code=status, headers=err.headers)


def describe_validation(errors) -> tuple[str, str | None]:
    """A readable message from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in list(errors)[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
            continue
        where = ".".join(loc)
        if not where and e.get("type") in ("model_attributes_type", "dict_type", "missing"):
            parts.append("the body must be a JSON object (Content-Type: application/json)")
            continue
        param = param or (e.get("ctx") or {}).get("param") or (loc[0] if loc else None)  # ctx: unsupported_parameter
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param
