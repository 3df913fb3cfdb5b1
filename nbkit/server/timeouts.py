"""Deadlines for slow clients: the request head (uvicorn has none), the body, and SSE sends.

A slow-loris client opens connections and sends its request head a byte at a time, or never; uvicorn
waits for it forever and counts the connection against `limit_concurrency`. `HeadDeadlineProtocol` is
uvicorn's h11 protocol with a deadline on each request head: past it the client gets 408 and the
connection closes. The body's deadline is in security.BodyLimit, which reads the body anyway.
"""

from __future__ import annotations

import json
import logging

import h11
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("nbkit.server")

HEAD_TIMEOUT_BODY = json.dumps({"error": "the request head was not received in time", "error_type": "timeout"})


def head_deadline_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a `timeout`-second deadline for every request head."""

    class HeadDeadlineProtocol(H11Protocol):
        head_timeout = timeout

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: the body has its own deadline
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request on this keep-alive connection

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            body = HEAD_TIMEOUT_BODY.encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + body)
            self.transport.close()

    return HeadDeadlineProtocol


class TimedEventSourceResponse(EventSourceResponse):
    """An SSE response whose stalled client (it stopped reading) ends the stream quietly at `send_timeout`:
    the events generator is closed, which cancels the request and frees its slot and in-flight entry."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("a client stopped reading its stream for %s s: the stream was ended", self.send_timeout)
