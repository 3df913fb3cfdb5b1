"""Calibration while serving: a first start is ready at once and decodes plainly, the engine measures its forward
costs in idle time a call at a time, yields to a request that arrives, resumes with the samples it kept, takes
its slots from finished requests' kept KV, and prices trees once every shape has its rounds.

Resumption is checked on a fake clock (the prices must be exactly an uninterrupted calibration's); the engine's
behaviour on the order of its runner's calls, never on wall-clock time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import ToyTokenizer, hf_greedy, random_heads, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.runner import TreeInput
from nbkit.engine.speculation import Calibrate, Calibration, calibrate
from nbkit.engine.torch_runner import TorchRunner
from nbkit.engine.warmup import warm_up, warming_up

PROMPT = [5, 6, 7, 8, 9]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PricedRunner:
    """A fake runner whose verification costs 1 ms per token plus 2 ms per row on the fake clock; it counts the
    slots it hands out."""

    device, dtype, max_slots = torch.device("cpu"), torch.float32, 4

    def __init__(self, clock: FakeClock):
        self.clock, self.free_slots, self.prefills = clock, [0, 1, 2, 3], 0

    def alloc(self) -> int:
        return self.free_slots.pop()

    def free(self, slot: int) -> None:
        self.free_slots.append(slot)

    def prefill(self, chunks):
        self.prefills += 1
        return {}

    def synchronize(self):
        pass

    def verify(self, batch: list[TreeInput]):
        self.clock.now += 0.001 * sum(len(b.tokens) for b in batch) + 0.002 * len(batch)
        return {}


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def test_a_calibration_that_yields_keeps_its_samples_frees_its_slots_and_prices_as_one_that_did_not(clock):
    whole = calibrate(PricedRunner(clock), None, max_batch=4, max_tree=8, repeats=3, max_tokens=8)

    runner = PricedRunner(clock)
    calibration = Calibration(runner, None, max_batch=4, max_tree=8, repeats=3, max_tokens=8)
    calls = {"n": 0}

    def every_fifth_call() -> bool:  # a request arrives every 5 calls
        calls["n"] += 1
        return calls["n"] % 6 == 0

    progress = []
    while not calibration.advance(should_yield=every_fifth_call):
        assert sorted(runner.free_slots) == [0, 1, 2, 3], "a calibration that yields holds no slot"
        progress.append(calibration.progress())
    assert calibration.done and calibration.resumes == len(progress) + 1 > 3
    assert progress == sorted(progress) and 0 < progress[0] < progress[-1] < 1  # it went on, never started over
    assert sorted(runner.free_slots) == [0, 1, 2, 3]
    resumed = calibration.cost_model()
    assert resumed.points == whole.points and resumed.measured == whole.measured
    assert set(whole.measured) >= {(4, t) for t in (1, 2, 3, 4)}  # the batch shapes are timed too


def test_a_calibration_yields_before_its_first_call_and_cannot_be_priced_unfinished(clock):
    runner = PricedRunner(clock)
    calibration = Calibration(runner, None, max_batch=4, max_tree=8, repeats=3, max_tokens=8)
    assert calibration.advance(should_yield=lambda: True) is False
    assert calibration.progress() == 0 and runner.prefills == 0 and sorted(runner.free_slots) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="not finished"):
        calibration.cost_model()


# ---- the engine ------------------------------------------------------------------------------------------
class RecordingRunner(TorchRunner):
    """A real runner that logs its calls in order (and makes each verification cost a few ms, so that a
    calibration spans many of the test's checks)."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.log: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def note(self, event: str, detail: object = None) -> None:
        with self.lock:
            self.log.append((event, detail))

    def prefill(self, chunks):
        for ids in chunks.values():
            self.note("prefill", tuple(ids))
        return super().prefill(chunks)

    def verify(self, batch):
        self.note("verify", len(batch))
        time.sleep(0.003)
        return super().verify(batch)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _engine(model, calibrate=Calibrate.WHILE_SERVING, max_slots: int = 4) -> Engine:
    heads = random_heads(model, n_heads=2)
    runner = RecordingRunner(model, max_slots=max_slots)
    return Engine(runner, ToyTokenizer(model.config.vocab_size), heads, max_batch=max_slots, calibrate=calibrate)


def _wait_priced(engine: Engine, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.speculation.measuring and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.speculation.measuring, "the calibration did not finish in idle time"


def test_the_engine_serves_plainly_at_once_and_prices_trees_in_idle_time(model):
    engine = _engine(model).start()
    try:
        assert engine.speculation.measuring and engine.limits().calibration == "measuring"
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        handle = engine.submit(PROMPT, params)
        submitted = len(engine.runner.log)
        first = handle.result(timeout=120)
        # Calibration yields: after the request arrived, at most the call in progress and the next one's slot
        # prefill ran before the request's prompt.
        log = engine.runner.log[submitted:]
        prompt_at = log.index(("prefill", tuple(PROMPT)))
        assert sum(event == "verify" for event, _ in log[:prompt_at]) <= 1, log[:prompt_at]
        # Served while measuring: plain decoding, one token per step, and the greedy answer.
        assert engine.counters["spec_steps"] == 0 and first.token_ids == hf_greedy(model, PROMPT, 24)
        assert 0 < engine.limits().calibration_progress < 1

        _wait_priced(engine)
        assert engine.limits().calibration == "measured" and engine.limits().calibration_progress is None
        assert engine.speculation.calibrations == 1 and engine.speculation.cost_model is not None
        assert engine.prefix.evictions >= 1, "the calibration took the finished request's kept slot"
        again = engine.generate(PROMPT, params)
        assert again.token_ids == first.token_ids  # lossless with trees priced too
    finally:
        engine.stop()
    held = set(engine.prefix.retained)
    assert len(engine.runner._free_slots) + len(held) == engine.runner.max_slots, "no slot leaked"


def test_a_request_that_names_its_tree_gets_it_while_the_engine_measures(model):
    engine = _engine(model).start()
    try:
        assert engine.speculation.measuring
        result = engine.submit(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True, tree="chain-2")).result(120)
        assert engine.counters["spec_steps"] > 0 and result.token_ids == hf_greedy(model, PROMPT, 16)
    finally:
        engine.stop()


def test_at_start_calibrates_before_ready(model):
    engine = _engine(model, calibrate="at-start").start()
    try:
        assert not engine.speculation.measuring and engine.limits().calibration == "measured"
        assert engine.speculation.calibrations == 1
    finally:
        engine.stop()


def test_the_warm_up_goes_on_with_the_fresh_runner_of_a_restarted_engine(model):
    """A crash replaces the runner (threads.EngineLoop._restart_after): the check and the calibration left for
    idle time go on with the new one, never with the closed one."""
    engine = Engine(RecordingRunner(model, max_slots=4), ToyTokenizer(model.config.vocab_size),
                    random_heads(model, n_heads=2), max_batch=4, self_check=True)
    engine.prepare(while_serving=True)
    assert warming_up(engine)
    old, engine.runner = engine.runner, RecordingRunner(model, max_slots=4)
    seen = len(old.log)
    warm_up(engine, lambda: False)
    assert not warming_up(engine) and engine.limits().calibration == "measured"
    assert len(old.log) == seen and any(event == "verify" for event, _ in engine.runner.log)
    assert len(engine.runner._free_slots) == 4
