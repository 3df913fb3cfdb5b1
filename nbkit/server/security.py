"""Guards in front of the app: body size, API keys and per-key rate limits (plain ASGI middleware).

They sit outside FastAPI so that they cover every route, /docs and /openapi.json included, and
answer before a body is parsed. Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time

from .errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/"})  # the chat page itself holds nothing; its API calls carry the key


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether or not Content-Length is declared."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                return await _reject(scope, send, APIError(400, "invalid Content-Length header"))
            if too_big:
                return await _reject(scope, send, self._error())
        # Read the body here (counting), then hand it to the app in one piece.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _reject(scope, send, self._error())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: disconnect notices

        await self.app(scope, replay, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")


class Guard:
    """API keys (Bearer) on every route but OPEN_PATHS, and a token-bucket rate limit per key on POSTs.

    `rate_limit` is requests per minute per key (bursts up to the same number); None or 0 turns it
    off. Without keys there is nothing to limit by: behind a tunnel every client has the same address.
    """

    def __init__(self, app, keys: list[str], rate_limit: float | None = None):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.rate = (rate_limit or 0) / 60.0
        self.burst = float(rate_limit or 0)
        self.buckets: dict[int, tuple[float, float]] = {}  # key index -> (tokens, last update)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not self.keys:
            return await self.app(scope, receive, send)
        index = self._key_index(_header(scope, b"authorization"))
        if index is None:
            err = APIError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await _reject(scope, send, err)
        if self.rate > 0 and scope["method"] == "POST":
            wait = self._take(index)
            if wait > 0:
                err = APIError(429, "rate limit exceeded: slow down", "rate_limit", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
                return await _reject(scope, send, err)
        await self.app(scope, receive, send)

    def _key_index(self, header: bytes | None) -> int | None:
        if header is None or header[:7].lower() != b"bearer ":
            return None
        given = header[7:].strip()
        found = None
        for i, key in enumerate(self.keys):  # compare with every key: the time does not say which one matched
            if hmac.compare_digest(given, key) and found is None:
                found = i
        return found

    def _take(self, key: int) -> float:
        """Take one token; 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens - 1.0, now)
        return 0.0


# Tokens a notebook server may hold in its environment (hub downloads, tunnels) besides its API keys.
SECRET_ENV = ("NBKIT_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "NGROK_AUTHTOKEN", "NGROK_API_KEY")
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "nbkit", "nbkit.server", "nbkit.engine")


class RedactSecrets(logging.Filter):
    """Replace known secrets with *** in the server's log records.

    Keys travel in headers, which are never logged; but a client may put one in a URL (`?api_key=`),
    and the access log prints URLs. Attached to the loggers themselves, so it works whatever handlers
    the notebook or uvicorn configured.
    """

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()

    def redact(self, value):
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "***")
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.redact(record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(self.redact(a) for a in record.args)
            elif isinstance(record.args, dict):
                record.args = {k: self.redact(v) for k, v in record.args.items()}
        return True


_redactor = RedactSecrets()


def redact_logs(keys: list[str]) -> None:
    """Keep `keys` and the tokens in the environment out of the server's logs (from now on)."""
    secrets = set(keys) | {os.environ[name] for name in SECRET_ENV if os.environ.get(name)}
    _redactor.secrets |= {s for s in secrets if len(s) >= 6}  # not a short word that would blank out logs
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if _redactor not in logger.filters:
            logger.addFilter(_redactor)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


async def _reject(scope, send, err: APIError) -> None:
    response = error_response(scope["path"], err)

    async def no_body():
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)
