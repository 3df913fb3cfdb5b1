"""Latency in the logs, against a real server over a tiny model: one "nbkit.requests" line per finished request
on every route (streamed or not), the engine's periodic line, and never the prompt text or a key in any record."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from helpers.server import TINY_MODEL, sse_data, tiny_engine

from nbkit.server.app import Settings
from nbkit.server.launch import start_server

KEY = "latency-log-key-0123456789"
MARKER = "ZQXJVW"  # prompt text that must never reach a log record
FIELDS = ("route", "finish", "prompt_tokens", "cached_tokens", "completion_tokens", "queue", "ttft", "total",
          "tok_s", "tokens_per_step")


@pytest.fixture(scope="module")
def server():
    # A tiny interval: every step after the first ends one, so the engine line shows without a wall clock.
    handle = start_server(tiny_engine(), port=0, settings=Settings(api_key=KEY, log_interval=1e-6))
    yield handle
    handle.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def request_lines(caplog) -> list[dict[str, str]]:
    return [fields(r.getMessage()) for r in caplog.records if r.name == "nbkit.requests"]


def test_one_line_per_finished_request_on_every_route(server, http, caplog):
    caplog.set_level(logging.DEBUG)
    prompt = f"tell me {MARKER}"
    r = http.post("/generate", json={"prompt": prompt, "max_tokens": 5})
    assert r.status_code == 200
    with http.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": {"max_new_tokens": 4}}) as s:
        assert sse_data(s)
    r = http.post("/v1/chat/completions", json={"model": TINY_MODEL, "max_tokens": 6,
                                                "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200
    with http.stream("POST", "/v1/completions", json={"model": TINY_MODEL, "prompt": prompt, "max_tokens": 3,
                                                      "stream": True}) as s:
        assert sse_data(s)
    assert httpx.post(server.url + "/generate", json={"prompt": MARKER},
                      headers={"Authorization": "Bearer wrong-key-but-long-enough"}).status_code == 401

    lines = request_lines(caplog)
    assert [x["route"] for x in lines] == ["/generate", "/generate_stream", "/v1/chat/completions",
                                           "/v1/completions"]
    assert [int(x["completion_tokens"]) for x in lines] == [5, 4, 6, 3]  # the tiny model never picks EOS here
    # The first prompt prefills in full; the second is the same text, so its KV is reused (the prefix cache).
    assert lines[0]["cached_tokens"] == "0" and int(lines[1]["cached_tokens"]) > 0
    for x in lines:
        assert set(FIELDS) <= set(x), x
        assert x["finish"] == "length" and int(x["prompt_tokens"]) > len(MARKER)
        assert 0 <= int(x["cached_tokens"]) < int(x["prompt_tokens"])
        queue, ttft, total = (float(x[k].rstrip("s")) for k in ("queue", "ttft", "total"))
        assert 0 <= queue <= ttft <= total
        assert float(x["tokens_per_step"]) >= 1.0
    for record in caplog.records:
        text = record.getMessage() + repr(record.args)
        assert MARKER not in text and KEY not in text and "wrong-key" not in text, text


def test_the_engine_line_shows_while_busy(http, caplog):
    caplog.set_level(logging.INFO)
    assert http.post("/generate", json={"prompt": "abc", "max_tokens": 8}).status_code == 200
    lines = [fields(r.getMessage()) for r in caplog.records
             if r.name == "nbkit.engine" and "gen_tok_s=" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    expected = {"running", "waiting", "prompt_tok_s", "gen_tok_s", "kv_use", "prefix_hit_rate", "speculation"}
    assert expected <= set(lines[0])
    assert lines[0]["prefix_hit_rate"].endswith("%")  # the prefix cache is on by default


def test_show_logs_prints_each_line_once_on_the_current_stdout(capsys):
    from nbkit.server.request_log import ConsoleHandler, show_logs

    logger = logging.getLogger("nbkit")
    level = logger.level
    try:
        show_logs("info", "stdout")
        show_logs("info", "stdout")  # a re-run serve cell
        logging.getLogger("nbkit.requests").info("route=/generate finish=length")
        logging.getLogger("nbkit.engine").debug("not at info")
        out = capsys.readouterr().out  # the handler looks sys.stdout up per line: capsys's here
        assert out.count("nbkit.requests: route=/generate finish=length") == 1 and "not at info" not in out
    finally:
        for h in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
            logger.removeHandler(h)
        logger.setLevel(level)
