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
