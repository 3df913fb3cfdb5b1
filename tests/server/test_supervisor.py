"""The engine supervisor (issue 13): a dead engine comes back by itself.

Attack: before, one exception outside the per-request isolation (head top-k, commit, emit) killed the engine
thread for good, and every later request got 503 until the notebook cell was re-run.
Floor: the engine killed 3 times under load: healthy again each time, nothing hangs, every request answered.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from helpers.server import tiny_engine, wait_for

from nbkit.engine.request import SamplingParams
from nbkit.server.launch import start_server


class EngineCrash(BaseException):
    """Not an Exception: it escapes every per-request handler and kills the engine loop."""


def crash_once(engine):
    """The next pass kills the engine loop (the restarted engine gets a fresh runner, without the fault)."""
    fired = threading.Event()

    def inject(state):
        if not fired.is_set():
            fired.set()
            raise EngineCrash("injected: the engine thread dies")

    engine.runner.fault = inject
    return fired


def restarts(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("nbkit_engine_restarts_total"):
            return float(line.split()[-1])
    raise AssertionError("no nbkit_engine_restarts_total in /metrics")


@pytest.mark.slow
def test_engine_killed_three_times_under_load_comes_back_and_answers_everyone():
    engine = tiny_engine(max_batch=4, max_queue=64)
    handle = start_server(engine, port=0)
    url, results, stop = handle.url, [], threading.Event()

    def client(i: int):
        with httpx.Client(base_url=url, timeout=30) as http:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = http.post("/generate", json={"prompt": f"client {i} request {n}", "max_tokens": 24})
                    results.append((r.status_code, r.text))
                    if r.status_code == 503:
                        time.sleep(0.2)  # as a client that honours Retry-After would, only sooner
                except httpx.HTTPError as err:  # a hang or a dropped connection: must not happen
                    results.append((0, repr(err)))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for t in clients:
            t.start()
        for kill in range(1, 4):
            assert wait_for(lambda: engine.snapshot()["running"] >= 2, 30)
            died = time.monotonic()
            assert crash_once(engine).wait(10)
            assert wait_for(lambda: engine.alive and httpx.get(url + "/health").status_code == 200, 10)
            back = time.monotonic() - died
            assert back < 5, f"the engine took {back:.1f} s to come back"
            assert restarts(url) == kill
            print(f"\nkill {kill}: healthy again after {back:.2f} s")
            time.sleep(0.5)  # some normal traffic between kills
        after = httpx.post(url + "/generate", json={"prompt": "after the kills", "max_tokens": 8}, timeout=30)
        assert after.status_code == 200, after.text  # serving again after the third restart
    finally:
        stop.set()
        for t in clients:
            t.join(40)
        handle.stop(grace=0)
    assert not any(t.is_alive() for t in clients), "a client is still waiting: a request was never answered"
    codes = [code for code, _ in results]
    assert 0 not in codes, [text for code, text in results if code == 0][:3]
    assert set(codes) <= {200, 503}, {c for c in codes if c not in (200, 503)}
    failed = [text for code, text in results if code == 503]
    assert 3 <= len(failed) and all("engine" in text for text in failed)  # the requests held at each crash
    assert codes.count(200) >= 1
    print(f"{len(codes)} requests: {codes.count(200)} answered 200, {len(failed)} got 503 at the crashes")


def test_crash_loop_backs_off():
    engine = tiny_engine(max_batch=2)

    def always(state):
        raise EngineCrash("injected: crashes on every request")

    engine.start()
    try:
        delays = []
        for _ in range(3):
            assert wait_for(lambda: engine.alive, 10)
            engine.runner.fault = always  # a restart brings a fresh runner: break it again (a crash loop)
            handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=4))
            fin = handle.result(timeout=10)
            assert fin.finish_reason == "error" and fin.error_type == "unavailable" and "restarting in" in fin.error
            delays.append(engine.loop.restart_delay)
        assert delays == sorted(delays) and delays[-1] >= 4 * delays[0]  # doubling per crash in the window
        assert wait_for(lambda: engine.alive, 10)
        assert engine.generate([5, 6, 7], SamplingParams(max_tokens=4)).finish_reason in ("length", "eos_token")
    finally:
        engine.stop()
