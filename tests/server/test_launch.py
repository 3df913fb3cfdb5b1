"""The launcher (a server in a notebook thread) and `python -m nbkit serve`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers.server import reference_text, tiny_engine, wait_for

from nbkit.engine.loader import load_engine
from nbkit.engine.speculation import CostModel
from nbkit.server.launch import current_server, start_server


def server_threads() -> int:
    return sum(t.name == "nbkit-server" and t.is_alive() for t in threading.enumerate())


def test_taken_port_is_a_clear_error():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        engine = tiny_engine()
        start = time.monotonic()
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_server(engine, port=port)
        assert time.monotonic() - start < 2
    assert server_threads() == 0 and not engine.alive and current_server() is None


def test_second_call_replaces_the_previous_server():
    first_engine = tiny_engine()
    first = start_server(first_engine, port=0)
    assert httpx.get(first.url + "/health").status_code == 200
    second = start_server(tiny_engine(), port=first.port)  # the same port: the first one let it go
    try:
        assert not first.running and not first_engine.alive  # the launcher started that engine: it stopped it
        assert server_threads() == 1 and current_server() is second
        r = httpx.post(second.url + "/generate", json={"prompt": "again", "max_tokens": 4})
        assert r.json()["response"] == reference_text(second.engine.encode("again"), 4)
        kept = second.engine
        third = start_server(kept, port=0)  # handing back the same engine keeps it running
        assert not second.running and kept.alive and third.engine is kept and server_threads() == 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(second.url + "/health")
    finally:
        current_server().stop()
    assert not kept.alive and server_threads() == 0 and current_server() is None
    assert third.engine is None  # released, so that its weights can be freed


def test_engine_given_running_is_left_running():
    engine = tiny_engine().start()
    try:
        with start_server(engine, port=0) as handle:
            assert httpx.get(handle.url + "/health").json() == {"status": "ok"}
        assert engine.alive  # not the launcher's to stop
    finally:
        engine.stop()


def test_stop_lets_inflight_requests_finish_then_refuses():
    engine = tiny_engine()
    engine.runner.fault = lambda slot: time.sleep(0.02)
    handle = start_server(engine, port=0)
    result = {}
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(handle.url + "/generate", json={"prompt": "finish me", "max_tokens": 40}, timeout=30)))
    t.start()
    assert wait_for(lambda: engine.snapshot()["running"] == 1)
    start = time.monotonic()
    stopper = threading.Thread(target=handle.stop, kwargs={"grace": 10})
    stopper.start()
    assert wait_for(lambda: handle.app.state.service.stopping)
    late = httpx.post(handle.url + "/generate", json={"prompt": "too late", "max_tokens": 2}, timeout=5)
    assert late.status_code == 503 and late.json()["error_type"] == "unavailable"
    assert httpx.get(handle.url + "/health").json()["status"] == "stopping"
    stopper.join(10)
    t.join(5)
    assert result["r"].status_code == 200  # finished during the grace period, not cut
    assert result["r"].json()["response"] == reference_text(engine.encode("finish me"), 40)
    assert time.monotonic() - start < 8 and not handle.running and not engine.alive


def test_stop_without_grace_ends_streams_promptly():
    engine = tiny_engine()
    engine.runner.fault = lambda slot: time.sleep(0.02)
    handle = start_server(engine, port=0)
    events = []

    def stream():
        with httpx.stream("POST", handle.url + "/generate_stream", json={"prompt": "x", "max_tokens": 900},
                          timeout=30) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data:"))

    t = threading.Thread(target=stream)
    t.start()
    assert wait_for(lambda: engine.snapshot()["running"] == 1)
    start = time.monotonic()
    handle.stop(grace=0)
    t.join(10)
    assert not t.is_alive() and time.monotonic() - start < 5
    assert '"error_type":"cancelled"' in events[-1]


def test_unknown_or_missing_engine_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine("tensorrt")
    monkeypatch.setitem(sys.modules, "nbkit.engine.llamacpp.runner", None)  # as if not installed
    with pytest.raises(ValueError, match="llama.cpp engine is not available"):
        load_engine("llamacpp", model=None)
    with pytest.raises(ValueError, match="llama.cpp engine is not available"):
        start_server(engine="llamacpp", port=0)
    assert server_threads() == 0




# ---- the embedded model (real weights) -----------------------------------------------------------

def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_embedded_model_served_end_to_end():
    cost = CostModel.from_function(lambda n: 0.03 + 0.0015 * n)  # skip the start-up calibration
    with start_server(port=0, max_batch=2, cost_model=cost) as handle:
        engine = handle.engine
        tok = engine.tokenizer
        prompt = "The capital of France is"
        r = httpx.post(handle.url + "/generate", json={"prompt": prompt, "max_tokens": 8}, timeout=60)
        assert r.status_code == 200
        ids = engine.encode(prompt)
        expected = tok.decode(_hf_greedy(engine.runner.model, ids, 8), skip_special_tokens=True)
        assert r.json()["response"] == expected
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Say hello."}]
        chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                                     max_tokens=8, temperature=0, stream=True))
        chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        expected = tok.decode(_hf_greedy(engine.runner.model, chat_ids, 8), skip_special_tokens=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert not engine.alive


@pytest.mark.slow
def test_cli_serve_foreground_and_sigterm(tmp_path):
    env = dict(os.environ, NBKIT_API_KEY="cli-secret-key-42")
    proc = subprocess.Popen([sys.executable, "-m", "nbkit", "serve", "--port", "0", "--speculation", "off",
                             "--max-batch", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, output = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if m := re.search(r"nbkit serve: (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "".join(output)
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/info").status_code == 401
        key = {"Authorization": "Bearer cli-secret-key-42"}
        r = httpx.post(url + "/generate", json={"prompt": "Hi", "max_tokens": 3}, headers=key, timeout=60)
        assert r.status_code == 200 and r.json()["completion_tokens"] >= 1
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert time.monotonic() - start < 15
        assert "cli-secret-key-42" not in "".join(output) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
