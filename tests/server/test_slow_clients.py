"""Slow clients cannot hold the server (issue 13 floor), loopback only, bounded in time.

32 slow-loris connections (16 dribble their request head, 16 their body) and 32 streaming readers that never
read, against a running server: normal requests keep being answered meanwhile, the slow-loris ones get 408
at their deadline, and every stalled stream frees its slot and its in-flight entry within the send timeout.
Before: no head or body deadline, no SSE send timeout, so all of them were held forever.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from helpers.server import tiny_engine, wait_for

from nbkit.server.app import Settings
from nbkit.server.launch import start_server

HEAD, BODY, SEND = 2.0, 2.0, 2.0
LONG_NAME = "m" * 300  # every OpenAI chunk carries the model name: a stream fills socket buffers sooner


def raw(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def dribble(s: socket.socket, data: bytes, stop: threading.Event, every: float = 0.5) -> None:
    for b in data:
        if stop.wait(every):
            return
        try:
            s.send(bytes([b]))
        except OSError:
            return  # the server closed it: that is the point


def read_status(s: socket.socket) -> int | None:
    try:
        head = s.recv(200)
    except OSError:
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


@pytest.mark.slow
def test_slow_loris_and_stalled_readers_do_not_hold_the_server():
    engine = tiny_engine(max_batch=16, max_queue=64, speculation="off")
    engine.eos_ids = set()  # streams run to max_tokens, so that they do fill the socket buffers
    settings = Settings(model_name=LONG_NAME, head_timeout=HEAD, body_timeout=BODY, send_timeout=SEND)
    handle = start_server(engine, port=0, settings=settings)
    handle._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # accepted sockets inherit it
    svc, stop, sockets = handle.app.state.service, threading.Event(), []
    try:
        loris_head, loris_body, readers = [], [], []
        body = json.dumps({"prompt": "slow", "max_tokens": 2}).encode()
        for _ in range(16):
            s = raw(handle.port)
            threading.Thread(target=dribble, args=(s, b"POST /generate HTTP/1.1\r\nHost: x\r\n" * 20, stop),
                             daemon=True).start()
            loris_head.append(s)
            s = raw(handle.port)
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            threading.Thread(target=dribble, args=(s, body, stop), daemon=True).start()
            loris_body.append(s)
        started = time.monotonic()
        for i in range(32):
            s = raw(handle.port, rcvbuf=4096)
            req = json.dumps({"model": "x", "prompt": f"never read {i}", "max_tokens": 300, "stream": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(req) + req)
            readers.append(s)
        sockets = loris_head + loris_body + readers
        # Normal requests are answered all along.
        latencies = []
        with httpx.Client(base_url=handle.url, timeout=120) as http:  # queued FIFO behind the streams: slow CPU
            for i in range(6):
                t0 = time.monotonic()
                r = http.post("/generate", json={"prompt": f"normal {i}", "max_tokens": 4})
                assert r.status_code == 200, r.text
                latencies.append(time.monotonic() - t0)
                assert http.get("/health").status_code == 200
        # Slow-loris: 408 at the deadline (the connection slot is free again).
        assert all(read_status(s) == 408 for s in loris_head + loris_body)
        # Stalled readers: their streams end at the send timeout, freeing slots and in-flight entries.
        assert wait_for(lambda: not svc.inflight and engine.snapshot()["running"] == 0, 120)
        freed = time.monotonic() - started
        print(f"\nnormal requests: max {max(latencies):.2f} s; stalled streams all freed after {freed:.1f} s")
        assert engine.counters["cancelled"] > 0  # some were cut by the send timeout, not run to the end
        with httpx.Client(base_url=handle.url, timeout=30) as http:
            assert http.post("/generate", json={"prompt": "after", "max_tokens": 4}).status_code == 200
    finally:
        stop.set()
        for s in sockets:
            s.close()
        handle.stop(grace=0)
