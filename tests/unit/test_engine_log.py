"""The periodic engine line (engine/stats_log.py) and the timings a Finished carries for the request log.

A tiny engine stepped by hand under a fake clock: a line once an interval of work has passed, none while idle."""

from __future__ import annotations

import logging

import pytest
from helpers.server import tiny_engine

from nbkit.engine.request import SamplingParams
from nbkit.engine.stats_log import EngineLog, Mark, engine_line

FIELDS = ("running=", "waiting=", "prompt_tok_s=", "gen_tok_s=", "kv_use=", "kv_tokens=", "prefix_hit_rate=",
          "speculation=", "tree=", "tokens_per_spec_step=")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nbkit.engine" and "gen_tok_s=" in r.getMessage()]


def run_until_idle(engine, clock: FakeClock, tick: float) -> int:
    steps = 0
    while engine.active or engine.waiting:
        engine.step()
        clock.now += tick
        steps += 1
    return steps


@pytest.fixture
def engine():
    return tiny_engine(max_batch=2).prepare()


def test_a_line_per_interval_while_busy_and_none_while_idle(engine, caplog):
    caplog.set_level(logging.INFO, logger="nbkit")
    clock = FakeClock()
    EngineLog(engine, interval=10.0, clock=clock).attach()
    handles = [engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=12, ignore_eos=True)) for _ in range(3)]
    steps = run_until_idle(engine, clock, tick=1.0)
    assert all(h.finished is not None for h in handles)
    lines = engine_lines(caplog)
    assert steps >= 12 and 1 <= len(lines) <= steps // 10, lines
    for line in lines:
        assert all(f in line for f in FIELDS), line
    assert "waiting=1" in lines[0]  # two slots: the third request is queued
    assert float(lines[0].split("prompt_tok_s=")[1].split()[0]) > 0  # the prompts before the first step count
    gen = float(lines[0].split("gen_tok_s=")[1].split()[0])
    assert gen > 0

    caplog.clear()  # idle: time passes, nothing is stepped or logged; the next work opens a fresh interval
    clock.now += 1000.0
    engine.submit([9, 10], SamplingParams(max_tokens=3, ignore_eos=True))
    run_until_idle(engine, clock, tick=1.0)
    assert engine_lines(caplog) == []


def test_rates_are_over_the_interval(engine, caplog):
    caplog.set_level(logging.INFO, logger="nbkit")
    clock = FakeClock()
    EngineLog(engine, interval=4.0, clock=clock).attach()
    engine.submit([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True, speculate=False))
    run_until_idle(engine, clock, tick=0.5)
    first, second = engine_lines(caplog)[:2]
    # The first interval counts the prompt (3 tokens in 4 s) and the token its prefill gave.
    assert "prompt_tok_s=0.8" in first and "running=1 waiting=0" in first, first
    # Then plain decoding, one request: one token per step, steps 0.5 s apart -> 2 tokens/s, no prompt.
    assert "prompt_tok_s=0.0 gen_tok_s=2.0" in second, second
    assert "speculation=adaptive" in second and "tokens_per_spec_step=0.00" in second


def test_off_is_leaving_it_out():
    with pytest.raises(ValueError):
        EngineLog(object(), interval=0)


def test_snapshot_reports_kv_in_use(engine):
    assert engine.snapshot()["kv_used_tokens"] == 0 and engine.snapshot()["kv_bytes"] == 0  # allocated lazily
    engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()  # admitted and prefilled: the 4 prompt tokens are in the cache, the first token is pending
    s = engine.snapshot()
    assert s["kv_used_tokens"] == 4 + 1 and s["kv_total_tokens"] == engine.runner.max_slots * engine.runner.max_context
    runner = engine.runner
    assert s["kv_bytes"] == runner.capacity * runner.max_slots * runner.kv_bytes_per_token() > 0


def test_finished_carries_queue_time_and_no_cached_tokens(engine):
    first = engine.submit([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    fin = None
    engine.step()
    while first.finished is None:
        engine.step()
    fin = first.finished
    assert fin.queue_time is not None and 0 <= fin.queue_time <= fin.time_to_first_token <= fin.latency
    assert fin.cached_tokens == 0


def test_the_hit_rate_reads_off_without_a_prefix_cache(engine):
    s = engine.snapshot()
    assert "prefix_hit_rate=0.0%" in engine_line(s, Mark.of(0.0, s), 1.0)
    assert "prefix_hit_rate=off" in engine_line({**s, "prefix_cache": False}, Mark.of(0.0, s), 1.0)
