"""Faults on a real server over the embedded SmolLM2: clients that vanish, a request whose sampling
fails, an engine thread that dies, and a graceful stop with requests in flight.

Each test bounds every wait; traffic goes only to the 127.0.0.1 server it starts.
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
from helpers import FaultyRunner

from nbkit.engine.engine import Engine
from nbkit.engine.loader import load_engine
from nbkit.engine.request import Finished, Overloaded, SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.server.launch import start_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

COST = CostModel.from_function(lambda n: 0.03 + 0.0015 * n)  # skip the start-up calibration
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def engine(one_torch_thread):
    base = load_engine("torch", max_batch=8, max_queue=8, cost_model=COST)
    # Faults are injected by a wrapping runner (tests/helpers), never by a hook inside the engine.
    engine = Engine(FaultyRunner(base.runner), base.tokenizer, base.heads, max_batch=8, max_queue=8,
                    cost_model=COST, model_name=base.model_name).start()
    yield engine
    engine.stop()


def fresh_engine(base: Engine, max_batch: int, max_queue: int = 8) -> Engine:
    """Another engine over the same weights (own KV cache), for tests that break or stop it."""
    return Engine(base.runner.fresh(max_slots=max_batch), base.tokenizer, base.heads, max_queue=max_queue,
                  cost_model=COST, model_name=base.model_name).start()


@pytest.fixture
def server(engine):
    engine.runner.fault = None
    handle = start_server(engine, port=0)
    yield handle
    engine.runner.fault = None
    handle.stop(grace=0)


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def counting(n: int) -> str:
    """A prompt the model continues for hundreds of tokens (it counts on), distinct per n."""
    return ", ".join(str(n + i) for i in range(5)) + ","


def chat_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)


def solo(engine: Engine, ids: list[int], max_tokens: int) -> str:
    """The engine alone, one request at a time, greedy without speculation: the reference answer."""
    return engine.submit(ids, SamplingParams(max_tokens=max_tokens, speculate=False)).result(120).text


class Recorder:
    """Wraps engine.submit to see, per request, when it was cancelled and when it ended (engine steps)."""

    def __init__(self, engine: Engine):
        self.engine, self.records = engine, []
        self._submit = engine.submit
        engine.submit = self.submit

    def submit(self, prompt_ids, params=None):
        handle = self._submit(prompt_ids, params)
        rec = {"ids": list(prompt_ids), "handle": handle}
        cancel, push = handle.cancel, handle.push

        def recorded_cancel():
            rec.setdefault("cancel_step", self.engine.counters["steps"])
            rec.setdefault("cancel_at", time.monotonic())
            cancel()

        def recorded_push(event):
            if isinstance(event, Finished):
                rec.update(finish_step=self.engine.counters["steps"], finish_at=time.monotonic(),
                           reason=event.finish_reason)
            push(event)

        handle.cancel, handle.push = recorded_cancel, recorded_push
        self.records.append(rec)
        return handle

    def close(self):
        del self.engine.submit  # back to the class's method

    def find(self, ids: list[int]) -> dict:
        return next(r for r in self.records if r["ids"] == ids)


# ---- clients that disconnect ---------------------------------------------------------------------

def leaving_client(engine: Engine, kind: int, prompt: str) -> tuple[str, dict, list[int]]:
    """(route, body, prompt ids as the engine sees them): kinds 0-2 stream, 3-4 wait for a plain answer."""
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 300, "temperature": 0}
    return [
        ("/generate_stream", {"prompt": prompt, "max_tokens": 300}, engine.encode(prompt)),
        ("/v1/chat/completions", {**chat, "stream": True}, chat_ids(engine, prompt)),
        ("/v1/completions", {"prompt": prompt, "stream": True, "max_tokens": 300, "temperature": 0},
         engine.encode(prompt)),
        ("/generate", {"prompt": prompt, "max_tokens": 300}, engine.encode(prompt)),
        ("/v1/chat/completions", chat, chat_ids(engine, prompt)),
    ][kind]


def test_random_disconnects_free_their_slots_or_queue_places_within_a_step(server):
    engine, url = server.engine, server.url
    rng = random.Random(7)
    recorder = Recorder(engine)
    clients = []  # (route, prompt ids as the engine sees them, moment the client hung up)
    results = {}
    try:
        def streaming(i: int, path: str, body: dict, ids: list[int], events_before_leaving: int) -> None:
            with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        seen += 1
                        if seen > events_before_leaving:
                            break
                clients.append((path, ids, time.monotonic()))  # the with-block closes the connection now

        def plain(i: int, path: str, body: dict, ids: list[int], patience: float) -> None:
            try:
                httpx.post(url + path, json=body, timeout=patience)
                results[i] = "answered"  # too fast to leave: fine, but it must not count as a disconnect
            except httpx.TimeoutException:
                clients.append((path, ids, time.monotonic()))

        def bystander(i: int, prompt: str) -> None:
            results[i] = httpx.post(url + "/generate", json={"prompt": prompt, "max_tokens": 6}, timeout=120)

        threads = []
        for i in range(10):
            kind = i % 5
            args = leaving_client(engine, kind, counting(100 * i))
            if kind in (0, 1, 2):
                threads.append(threading.Thread(target=streaming, args=(i, *args, rng.randrange(0, 6))))
            else:
                threads.append(threading.Thread(target=plain, args=(i, *args, rng.uniform(0.3, 2.0))))
        bystanders = {"by-0": "The capital of France is", "by-1": "Write a haiku about the sea."}
        threads += [threading.Thread(target=bystander, args=(k, p)) for k, p in bystanders.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)

        assert len(clients) >= 6, "most clients should have left mid-request"
        assert wait_for(lambda: engine.snapshot()["running"] == 0 and engine.snapshot()["waiting"] == 0)
        assert wait_for(lambda: not server.app.state.service.inflight)
        for path, ids, left_at in clients:
            rec = recorder.find(ids)
            assert rec.get("reason") == "cancelled", (path, rec.get("reason"))
            assert rec["cancel_at"] - left_at < 1.5, (path, "the server noticed the disconnect late")
            assert rec["finish_step"] - rec["cancel_step"] <= 1, (path, "the slot or queue place was kept")
        lags = [recorder.find(ids)["cancel_at"] - left_at for _, ids, left_at in clients]
        steps = [recorder.find(ids)["finish_step"] - recorder.find(ids)["cancel_step"] for _, ids, _ in clients]
        print(f"\ndisconnects: {len(clients)} of 10 clients left mid-request; server noticed within "
              f"{max(lags):.2f} s, slot freed within {max(steps)} step(s)")
        for key, prompt in bystanders.items():
            assert results[key].status_code == 200
            assert results[key].json()["response"] == solo(engine, engine.encode(prompt), 6)
    finally:
        recorder.close()
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_cancelled_requests_leave_the_queue_at_the_next_step(engine):
    # A client that leaves while queued must not hold a queue place (new clients would get 429).
    queue = Engine(engine.runner.fresh(max_slots=1), engine.tokenizer, engine.heads, max_queue=2, cost_model=COST,
                   model_name=engine.model_name)
    ids = engine.encode(counting(1))
    running = queue.submit(ids, SamplingParams(max_tokens=50))
    waiting = [queue.submit(ids, SamplingParams(max_tokens=5)) for _ in range(2)]
    queue.step()  # the first one takes the slot; two wait
    assert queue.snapshot()["running"] == 1 and queue.snapshot()["waiting"] == 2
    with pytest.raises(Overloaded):
        queue.submit(ids, SamplingParams(max_tokens=5))
    for handle in waiting:
        handle.cancel()
    queue.step()
    assert [h.finished.finish_reason for h in waiting] == ["cancelled", "cancelled"]
    assert queue.snapshot()["waiting"] == 0 and running.finished is None
    queue.submit(ids, SamplingParams(max_tokens=5))  # the places are free again


# ---- a request whose sampling fails ----------------------------------------------------------------

def test_sampling_failure_ends_that_request_with_an_error_while_others_finish(server):
    engine, url = server.engine, server.url
    victims = {  # route -> prompt; each fails inside the engine, mid-stream or at its first token
        "/generate": counting(1000), "/v1/completions": counting(2000), "/generate_stream": counting(3000),
        "/v1/chat/completions": counting(4000), "first-token": counting(5000),
    }
    victim_ids = {tuple(engine.encode(p)) for p in victims.values()} | {
        tuple(chat_ids(engine, victims["/v1/chat/completions"]))}
    first_token_ids = tuple(engine.encode(victims["first-token"]))
    others = {"The capital of France is": 8, "def fibonacci(n):": 8, "List three prime numbers:": 5}
    expected = {p: solo(engine, engine.encode(p), n) for p, n in others.items()}

    def inject(slot):
        ids = tuple(slot.prompt_ids)
        if ids in victim_ids and (ids == first_token_ids or slot.n_output >= 3):
            raise RuntimeError("injected sampling failure")

    engine.runner.fault = inject
    out = {}

    def call(name, path, body, stream=False):
        if stream:
            with httpx.stream("POST", url + path, json=body, timeout=120) as r:
                out[name] = (r.status_code, [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")])
        else:
            r = httpx.post(url + path, json=body, timeout=120)
            out[name] = (r.status_code, r.json())

    calls = [
        ("v-generate", "/generate", {"prompt": victims["/generate"], "max_tokens": 50}, False),
        ("v-completions", "/v1/completions", {"prompt": victims["/v1/completions"], "max_tokens": 50,
                                              "temperature": 0}, False),
        ("v-stream", "/generate_stream", {"prompt": victims["/generate_stream"], "max_tokens": 50}, True),
        ("v-chat-stream", "/v1/chat/completions", {"messages": [{"role": "user",
                                                                 "content": victims["/v1/chat/completions"]}],
                                                   "stream": True, "max_tokens": 50, "temperature": 0}, True),
        ("v-first", "/generate", {"prompt": victims["first-token"], "max_tokens": 50}, False),
    ] + [(p, "/generate", {"prompt": p, "max_tokens": n}, False) for p, n in others.items()]
    threads = [threading.Thread(target=call, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    status, body = out["v-generate"]
    assert status == 424 and body["error_type"] == "generation" and "injected sampling failure" in body["error"]
    status, body = out["v-first"]
    assert status == 424 and "injected sampling failure" in body["error"]
    status, body = out["v-completions"]
    assert status == 500 and body["error"]["type"] == "server_error" and "injected" in body["error"]["message"]
    status, events = out["v-stream"]
    assert status == 200 and '"error_type":"generation"' in events[-1] and len(events) >= 3
    status, events = out["v-chat-stream"]
    assert status == 200 and events[-1] == "[DONE]" and "injected sampling failure" in events[-2]
    for prompt in others:
        status, body = out[prompt]
        assert status == 200 and body["response"] == expected[prompt], prompt
    engine.runner.fault = None
    assert engine.alive and httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.post(url + "/generate", json={"prompt": victims["/generate"], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["response"] == solo(engine, engine.encode(victims["/generate"]), 4)


# ---- the engine thread dies --------------------------------------------------------------------------

class EngineCrash(BaseException):
    """Not an Exception: it escapes the per-request error handling and kills the engine thread."""


def test_engine_death_fails_running_waiting_and_new_requests_fast(engine):
    doomed = fresh_engine(engine, max_batch=2, max_queue=8)
    doomed.loop.max_restarts = 0  # no supervisor: a dead engine stays dead (the restarts: tests/server/test_supervisor.py)
    handle = start_server(doomed, port=0)
    url, out = handle.url, {}
    try:
        def call(name, path, body, stream):
            start = time.monotonic()
            if stream:
                with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                    lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
                out[name] = (r.status_code, lines, time.monotonic() - start)
            else:
                r = httpx.post(url + path, json=body, timeout=60)
                out[name] = (r.status_code, r.json(), time.monotonic() - start)

        calls = [("run-stream", "/generate_stream", {"prompt": counting(1), "max_tokens": 400}, True),
                 ("run-plain", "/generate", {"prompt": counting(2), "max_tokens": 400}, False),
                 ("wait-plain", "/generate", {"prompt": counting(3), "max_tokens": 400}, False),
                 ("wait-chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 400}, False),
                 ("wait-stream", "/v1/completions", {"prompt": counting(4), "max_tokens": 400, "stream": True},
                  True)]
        threads = [threading.Thread(target=call, args=c) for c in calls]
        for t in threads:
            t.start()
        assert wait_for(lambda: doomed.snapshot()["running"] == 2 and doomed.snapshot()["waiting"] == 3, 60)
        assert wait_for(lambda: doomed.counters["tokens"] >= 2, 60)

        def crash(slot):
            raise EngineCrash("injected: the engine thread dies")

        died_at = time.monotonic()
        doomed.runner.fault = crash
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        ended = time.monotonic() - died_at
        assert ended < 5, f"requests took {ended:.1f} s to fail after the engine died"
        print(f"\nengine death: 2 running + 3 queued requests failed within {ended:.2f} s")
        for name in ("run-plain", "wait-plain"):
            status, body, _ = out[name]
            assert status == 503 and "engine thread died" in body["error"], (name, body)
        status, body, _ = out["wait-chat"]
        assert status == 503 and "engine thread died" in body["error"]["message"]
        status, lines, _ = out["run-stream"]
        assert status == 200 and "engine thread died" in lines[-1] and '"error_type"' in lines[-1]
        status, lines, _ = out["wait-stream"]
        assert status == 200 and lines[-1] == "[DONE]" and "engine thread died" in lines[-2]

        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "engine thread died" in health.json()["error"]
        for path, body in (("/generate", {"prompt": "x"}), ("/generate_stream", {"prompt": "x"}),
                           ("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            start = time.monotonic()
            r = httpx.post(url + path, json=body, timeout=10)
            assert r.status_code == 503 and time.monotonic() - start < 1.0, (path, r.text)
            assert "engine thread died" in r.text
        assert httpx.get(url + "/info").json()["status"] == "error"
    finally:
        handle.stop(grace=0)
        doomed.stop()


# ---- graceful stop --------------------------------------------------------------------------------------

def test_handle_stop_finishes_short_requests_cancels_long_ones_and_returns_in_time(engine):
    stoppable = fresh_engine(engine, max_batch=5, max_queue=8)
    handle = start_server(stoppable, port=0)
    url, out, grace = handle.url, {}, 8.0
    try:
        def call(name, path, body, stream):
            try:
                if stream:
                    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
                    out[name] = (r.status_code, lines)
                else:
                    r = httpx.post(url + path, json=body, timeout=60)
                    out[name] = (r.status_code, r.json())
            except httpx.HTTPError as err:
                out[name] = (None, repr(err))

        running = [("short-1", "/generate", {"prompt": counting(10), "max_tokens": 12}, False),
                   ("short-2", "/v1/completions", {"prompt": counting(20), "max_tokens": 12, "temperature": 0}, False),
                   ("long-stream", "/generate_stream", {"prompt": counting(1), "max_tokens": 500}, True),
                   ("long-chat-stream", "/v1/chat/completions", {"messages": [{"role": "user",
                                                                               "content": counting(2)}],
                                                                 "max_tokens": 500, "stream": True}, True),
                   ("long-plain", "/generate", {"prompt": counting(3), "max_tokens": 500}, False)]
        threads = [threading.Thread(target=call, args=c) for c in running]
        for t in threads:
            t.start()
        assert wait_for(lambda: stoppable.snapshot()["running"] == 5, 60)
        queued = threading.Thread(target=call, args=("queued", "/generate", {"prompt": counting(4),
                                                                              "max_tokens": 500}, False))
        queued.start()
        threads.append(queued)
        assert wait_for(lambda: stoppable.snapshot()["waiting"] == 1, 30)
        start = time.monotonic()
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": grace})
        stopper.start()
        assert wait_for(lambda: handle.app.state.service.stopping, 5)
        late = httpx.post(url + "/generate", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error_type"] == "unavailable"
        stopper.join(grace + 20)
        stopped_in = time.monotonic() - start
        for t in threads:
            t.join(20)
        assert not stopper.is_alive() and not any(t.is_alive() for t in threads)
        assert stopped_in < grace + 6, stopped_in
        print(f"\nhandle.stop(grace={grace}): returned after {stopped_in:.1f} s")
        assert not handle.running
        for name in ("short-1", "short-2"):  # running when the stop began: finished within the grace period
            assert out[name][0] == 200, out[name]
        assert out["short-1"][1]["finish_reason"] == "length" and out["short-1"][1]["completion_tokens"] == 12
        for name in ("long-stream", "long-chat-stream"):  # a complete answer, or cut at the end of the grace
            status, lines = out[name]  # period with a clear end
            assert status == 200 and ("cancelled" in " ".join(lines[-2:]) or '"finish_reason":"' in lines[-2]), (
                name, lines[-2:])
        assert '"error_type":"cancelled"' in out["long-stream"][1][-1]  # it counts to 500: still running
        for name in ("long-plain", "queued"):
            status, body = out[name]
            assert status == 503 and "stopping" in body["error"], (name, body)
        assert wait_for(lambda: stoppable.snapshot()["running"] == 0 and stoppable.snapshot()["waiting"] == 0)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        handle.stop(grace=0)
        stoppable.stop()
