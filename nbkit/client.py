"""What every nbkit client shares: the auth headers and the parsing of server-sent events.

Used by the notebook chat panel (widgets), the tunnel's helpers, the HTTP load test and the tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

DONE = "[DONE]"  # OpenAI's last `data:` line
SKIP_NGROK_WARNING = {"ngrok-skip-browser-warning": "1"}  # ngrok's free tier shows a page without it


def auth_headers(api_key: str | None, ngrok: bool = False) -> dict[str, str]:
    """`Authorization: Bearer KEY` when there is a key, and ngrok's skip-warning header behind ngrok."""
    headers = dict(SKIP_NGROK_WARNING) if ngrok else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def sse_data(line: str):
    """The payload of one SSE line: None for a line that carries no data (blank separator, comment,
    event name), DONE for OpenAI's end marker, else the decoded JSON (ValueError if it is not JSON)."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    return DONE if payload == DONE else json.loads(payload)


def sse_events(lines: Iterable[str]) -> Iterator:
    """The payloads of an SSE stream's lines (see sse_data), skipping lines without data."""
    for line in lines:
        if (data := sse_data(line)) is not None:
            yield data


async def asse_events(lines: AsyncIterable[str]) -> AsyncIterator:
    """sse_events for an async stream of lines (httpx's `aiter_lines()`)."""
    async for line in lines:
        if (data := sse_data(line)) is not None:
            yield data


def merge_tool_calls(calls: list[dict], deltas: list[dict]) -> list[dict]:
    """Fold a stream's `delta.tool_calls` into whole calls in OpenAI's form: a call's first delta brings its
    id and name, the later ones fragments of its arguments (JSON text) to append."""
    for delta in deltas:
        while len(calls) <= delta["index"]:
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call, function = calls[delta["index"]], delta.get("function") or {}
        call["id"] = delta.get("id") or call["id"]
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return calls


def tool_call_text(calls: list[dict]) -> str:
    """Calls as people read them: `→ name(arguments)`, the arguments pretty JSON (as sent while unfinished)."""
    lines = []
    for call in calls:
        arguments = call["function"]["arguments"]
        try:
            arguments = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
        except ValueError:
            pass  # still streaming, or not JSON: as it came
        lines.append(f"→ {call['function']['name']}({arguments})")
    return "\n".join(lines)
