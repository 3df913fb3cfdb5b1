"""Overload, disconnects, keys, rate limits, body size, loading and a dead engine, on real servers.

Each test starts its own small server (the launcher keeps one at a time). Steps are slowed with the
engine's fault-injection hook where a test needs requests that last long enough to observe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import openai
import pytest
from helpers.server import TINY_MODEL, reference_text, sse_data, tiny_engine, wait_for

from nbkit.server.app import Settings, create_app
from nbkit.server.launch import start_server


def slow_engine(seconds_per_step: float = 0.02, **kwargs):
    engine = tiny_engine(**kwargs)
    engine.runner.fault = lambda slot: time.sleep(seconds_per_step)
    return engine




@pytest.fixture
def slow_server():
    handle = start_server(slow_engine(max_batch=1, max_queue=1), port=0)
    yield handle
    handle.stop(grace=0)


def test_full_queue_answers_429_with_retry_after(slow_server):
    url, engine = slow_server.url, slow_server.engine
    results = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/generate_stream", json={"prompt": "long", "max_tokens": 400}) as running:
            assert running.status_code == 200
            assert wait_for(lambda: engine.snapshot()["running"] == 1)
            waiter = threading.Thread(target=lambda: results.update(
                queued=httpx.post(url + "/generate", json={"prompt": "queued", "max_tokens": 3}, timeout=30)))
            waiter.start()
            assert wait_for(lambda: engine.snapshot()["waiting"] == 1)
            r = http.post("/generate", json={"prompt": "one too many", "max_tokens": 3})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error_type"] == "overloaded"
            r = http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "x", "max_tokens": 3})
            assert r.status_code == 429 and r.headers["retry-after"]
            assert r.json()["error"]["code"] == "overloaded"
        # Leaving the stream disconnects it: the slot frees and the queued request runs.
        waiter.join(20)
    queued = results["queued"]
    assert queued.status_code == 200
    assert queued.json()["response"] == reference_text(engine.encode("queued"), 3)


def test_stream_disconnect_frees_the_slot(slow_server, caplog):
    engine = slow_server.engine
    caplog.set_level(logging.ERROR, logger="nbkit")
    cancelled = engine.snapshot()["cancelled"]
    with httpx.Client(base_url=slow_server.url, timeout=30) as http:
        for path, body in (("/generate_stream", {"prompt": "bye", "max_tokens": 400}),
                           ("/v1/chat/completions", {"model": TINY_MODEL, "stream": True, "max_tokens": 400,
                                                     "messages": [{"role": "user", "content": "bye"}]})):
            with http.stream("POST", path, json=body) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                # The chat stream's first chunk (the role) may leave before the engine's next step admits it.
                assert wait_for(lambda: engine.snapshot()["running"] == 1)
            assert wait_for(lambda: engine.snapshot()["running"] == 0), "the slot was not freed"
            cancelled += 1
            assert wait_for(lambda n=cancelled: engine.snapshot()["cancelled"] == n)
            assert not slow_server.app.state.service.inflight
        r = http.post("/generate", json={"prompt": "still here", "max_tokens": 5})
        assert r.json()["response"] == reference_text(engine.encode("still here"), 5)
    # A gone client is an ordinary end: closing its streams must not fail (aclose() on a running generator did).
    assert not [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_plain_request_disconnect_frees_the_slot(slow_server):
    engine = slow_server.engine
    cancelled = engine.snapshot()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/generate", json={"prompt": "impatient", "max_tokens": 400}, timeout=0.5)
    assert wait_for(lambda: engine.snapshot()["cancelled"] == cancelled + 1 and engine.snapshot()["running"] == 0)
    r = httpx.post(slow_server.url + "/generate", json={"prompt": "patient", "max_tokens": 4}, timeout=30)
    assert r.json()["response"] == reference_text(engine.encode("patient"), 4)


KEYS = ["key-alpha-0123456789", "key-beta-9876543210"]


@pytest.fixture
def keyed_server():
    handle = start_server(tiny_engine(), port=0, api_key=KEYS, settings=Settings(rate_limit=4),
                          log_level="debug")
    yield handle
    handle.stop(grace=0)


GUARDED = [("GET", "/info"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
           ("GET", "/v1/models"), ("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/v1/completions"),
           ("POST", "/v1/chat/completions"), ("GET", "/nothing-here")]


def test_api_key_guards_every_route_but_health(keyed_server, capfd):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/").status_code == 200  # the page holds nothing; its API calls need the key
        for method, path in GUARDED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]},
                            {"Authorization": "Bearer " + KEYS[0].upper()}, {"Authorization": "Basic " + KEYS[0]}):
                r = http.request(method, path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
                assert KEYS[0] not in r.text
        good = {"Authorization": "Bearer " + KEYS[1]}
        assert http.get("/info", headers=good).status_code == 200
        assert http.get("/metrics", headers={"authorization": "bearer " + KEYS[0]}).status_code == 200
        info = http.get("/info", headers=good)
        assert info.json()["api_key_required"] is True and all(k not in info.text for k in KEYS)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEYS[0], max_retries=0)
    out = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3, temperature=0)
    assert out.choices[0].message.content
    assert all(k not in repr(keyed_server.app.state.service.settings) for k in KEYS)
    logs = capfd.readouterr()
    assert all(k not in logs.out + logs.err for k in KEYS)


def test_rate_limit_is_per_key(keyed_server):
    a, b = ({"Authorization": "Bearer " + k} for k in KEYS)
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        body = {"prompt": "r", "max_tokens": 1}
        assert [http.post("/generate", json=body, headers=a).status_code for _ in range(4)] == [200] * 4
        r = http.post("/generate", json=body, headers=a)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error_type"] == "rate_limit"
        r = http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "r"}, headers=a)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert http.post("/generate", json=body, headers=b).status_code == 200  # the other key is unaffected
        assert http.get("/info", headers=a).status_code == 200  # reads are not rate limited


def test_body_size_limit():
    with (start_server(tiny_engine(), port=0, settings=Settings(max_body_bytes=2000)) as handle,
          httpx.Client(base_url=handle.url, timeout=30) as http):
        big = {"prompt": "x" * 3000}
        r = http.post("/generate", json=big)
        assert r.status_code == 413 and r.json()["error_type"] == "validation"
        r = http.post("/v1/completions", json={"model": TINY_MODEL, **big})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 300

        r = http.post("/generate", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert http.post("/generate", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_dead_engine_fails_fast_and_health_says_so():
    class Crash(BaseException):  # not an Exception: it escapes the engine's per-request error handling
        pass

    engine = slow_engine(0.02)
    with start_server(engine, port=0) as handle, httpx.Client(base_url=handle.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        result = {}
        t = threading.Thread(target=lambda: result.update(r=http.post("/generate", json={"prompt": "doomed",
                                                                                        "max_tokens": 300})))
        t.start()
        assert wait_for(lambda: engine.snapshot()["running"] == 1)

        def crash(slot):
            raise Crash("injected")

        engine.runner.fault = crash
        t.join(10)
        assert result["r"].status_code == 503 and "engine thread died" in result["r"].json()["error"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        start = time.monotonic()
        r = http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 503 and time.monotonic() - start < 2
        assert http.post("/generate_stream", json={"prompt": "x"}).status_code == 503


def test_health_is_503_while_loading_then_200():
    async def scenario():
        app = create_app(None, Settings())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            r = await http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = await http.post("/generate", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
            r = await http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                         "content": "x"}]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
            assert (await http.get("/info")).json()["status"] == "loading"
            engine = tiny_engine().start()
            try:
                app.state.service.attach(engine)
                r = await http.get("/health")
                assert r.status_code == 200 and r.json() == {"status": "ok"}
                r = await http.post("/generate", json={"prompt": "x", "max_tokens": 3})
                assert r.json()["response"] == reference_text(engine.encode("x"), 3)
            finally:
                engine.stop()

    asyncio.run(scenario())


def test_stream_error_event_when_generation_fails():
    engine = tiny_engine()
    with start_server(engine, port=0) as handle, httpx.Client(base_url=handle.url, timeout=30) as http:
        def fail(slot):
            if slot.n_output:  # after the first token: the error arrives mid-stream
                raise RuntimeError("injected sampling failure")

        engine.runner.fault = fail
        with http.stream("POST", "/generate_stream", json={"prompt": "x", "max_tokens": 20}) as r:
            events = sse_data(r)
        assert events[-1]["error_type"] == "generation" and "injected" in events[-1]["error"]
        r = http.post("/generate", json={"prompt": "x", "max_tokens": 20})
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
        r = http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "x", "max_tokens": 20})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        engine.runner.fault = None
        assert http.get("/health").status_code == 200
        assert http.post("/generate", json={"prompt": "x", "max_tokens": 3}).status_code == 200
