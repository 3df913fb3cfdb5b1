"""Guards in front of the app: body size, API keys and per-key rate limits (plain ASGI middleware).

They sit outside FastAPI so that they cover every route, /docs and /openapi.json included, and
answer before a body is parsed. Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time

from .errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/"})  # the chat page itself holds nothing; its API calls carry the key


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether or not Content-Length is declared."""

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout  # timeout: seconds to receive the whole body

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
        # Read the body here (counting, against the deadline), then hand it to the app in one piece.
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(self.timeout):
                status = await self._read(receive, chunks)
        except TimeoutError:
            return await _reject(scope, send, APIError(408, f"the request body was not received within "
                                                            f"{self.timeout:g} s", "timeout", code="timeout",
                                                       headers={"Connection": "close"}))
        if status == "gone":
            return  # the client went away before sending its body
        if status == "too_big":
            return await _reject(scope, send, self._error())
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: disconnect notices

        await self.app(scope, replay, send)

    async def _read(self, receive, chunks: list[bytes]) -> str:
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return "gone"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return "too_big"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return "ok"

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")


class Guard:
    """API keys (`Authorization: Bearer KEY`, or `X-Api-Key: KEY` as llama-server and Anthropic's clients send
    them) on every route but OPEN_PATHS, a token-bucket rate limit per key on POSTs, and a
    throttle on failed key attempts per client address.

    `rate_limit` is requests per minute per key (bursts up to the same number); None or 0 turns it
    off. Without keys there is nothing to limit by: behind a tunnel every client has the same address.
    `keys` is a list, or a callable returning the current list (so that a key can be rotated while serving).
    After `max_failures` wrong or missing keys from one address within `failure_window` seconds, that address
    gets 429 with Retry-After until the window ends (behind a local proxy such as ngrok, the address is the
    last X-Forwarded-For entry, the one the proxy added; direct local connections are not throttled).
    """

    def __init__(self, app, keys, rate_limit: float | None = None, max_failures: int = 10,
                 failure_window: float = 60.0, max_addresses: int = 10_000):
        self.app = app
        self._keys = keys if callable(keys) else (lambda fixed=list(keys): fixed)
        self.rate = (rate_limit or 0) / 60.0
        self.burst = float(rate_limit or 0)
        self.buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, last update)
        self.max_failures, self.failure_window, self.max_addresses = max_failures, failure_window, max_addresses
        self.failures: dict[str, tuple[int, float]] = {}  # address -> (failures, window start)

    @property
    def keys(self) -> list[bytes]:
        return [k.encode() for k in self._keys()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD")):
            return await self.app(scope, receive, send)  # POST / (TGI's generation route) needs the key
        keys = self.keys
        if not keys:
            return await self.app(scope, receive, send)
        address = _client_address(scope)
        wait = self._throttled(address) if address is not None else 0.0
        if wait > 0:
            err = APIError(429, "too many failed API key attempts from this address: wait", "rate_limit",
                           code="too_many_failed_attempts", headers={"Retry-After": str(max(1, math.ceil(wait)))})
            return await _reject(scope, send, err)
        key = self._match(keys, _given_key(scope))
        if key is None:
            if address is not None:
                self._failed(address)
            err = APIError(401, "a valid API key is required (Authorization: Bearer KEY, or X-Api-Key: KEY)",
                           "authentication",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await _reject(scope, send, err)
        if self.rate > 0 and scope["method"] == "POST":
            wait = self._take(key)
            if wait > 0:
                err = APIError(429, "rate limit exceeded: slow down", "rate_limit", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
                return await _reject(scope, send, err)
        await self.app(scope, receive, send)

    def _key_index(self, authorization: bytes | None) -> int | None:
        keys = self.keys
        key = self._match(keys, _bearer(authorization))
        return None if key is None else keys.index(key)

    @staticmethod
    def _match(keys: list[bytes], given: bytes | None) -> bytes | None:
        if given is None:
            return None
        found = None
        for key in keys:  # compare with every key: the time does not say which one matched
            if hmac.compare_digest(given, key) and found is None:
                found = key
        return found

    def _throttled(self, address: str) -> float:
        count, start = self.failures.get(address, (0, 0.0))
        left = start + self.failure_window - time.monotonic()
        if left <= 0:
            self.failures.pop(address, None)
            return 0.0
        return left if count >= self.max_failures else 0.0

    def _failed(self, address: str) -> None:
        now = time.monotonic()
        count, start = self.failures.get(address, (0, now))
        if now - start >= self.failure_window:
            count, start = 0, now
        if address not in self.failures and len(self.failures) >= self.max_addresses:
            # bounded memory: forget windows that ended, else the oldest address
            self.failures = {a: v for a, v in self.failures.items() if now - v[1] < self.failure_window}
            if len(self.failures) >= self.max_addresses:
                self.failures.pop(next(iter(self.failures)))
        self.failures[address] = (count + 1, start)

    def _take(self, key: bytes) -> float:
        """Take one token; 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens - 1.0, now)
        return 0.0


def _given_key(scope) -> bytes | None:
    """The key the client sent: a Bearer Authorization header, else X-Api-Key (None: neither)."""
    bearer = _bearer(_header(scope, b"authorization"))
    if bearer is not None:
        return bearer
    given = _header(scope, b"x-api-key")
    return given.strip() if given is not None else None


def _bearer(header: bytes | None) -> bytes | None:
    if header is None or header[:7].lower() != b"bearer ":
        return None
    return header[7:].strip()


def _client_address(scope) -> str | None:
    """The address to throttle: the peer's; behind a proxy on this machine (ngrok's agent, which adds
    X-Forwarded-For), the address that proxy saw. None for a direct connection from this machine (a local
    program or test, which can read the notebook anyway), which is not throttled."""
    host = (scope.get("client") or ("?", 0))[0]
    if host in ("127.0.0.1", "::1", "localhost"):
        forwarded = _header(scope, b"x-forwarded-for")
        if not forwarded:
            return None
        return forwarded.decode("latin-1").split(",")[-1].strip() or host
    return host


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
    env = {os.environ[name] for name in SECRET_ENV if os.environ.get(name)}
    # Every key, whatever its length; tokens from the environment unless they are a short word that would
    # blank out the logs.
    _redactor.secrets |= set(keys) | {s for s in env if len(s) >= 6}
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
