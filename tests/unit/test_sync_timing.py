"""Timings are taken after the work (issue 22, defect 4): a GPU returns from a call once its work is queued.

A lazy runner models that on a CPU: each call returns at once and queues its cost; the next call waits for the
work queued before it (a queue one deep), and `synchronize()` waits for all of it. Time is a fake clock that
only the queue moves, so the figures are exact and no test reads the wall clock. Timed without synchronizing,
every shape is charged the shape timed before it (the curve comes out shifted, inverted where sizes wrap
around), and an engine step is charged the prefill queued before it instead of its own commit.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import ToyTokenizer, tiny_llama

from nbkit.engine import engine as engine_module
from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import calibration
from nbkit.engine.speculation.calibration import calibrate
from nbkit.engine.speculation.costs import CostModel
from nbkit.engine.torch_runner import TorchRunner

PREFILL, COMMIT = 0.5, 0.002  # a prompt costs far more than a commit: charged to a step, it shows


def verify_cost(batch) -> float:
    return 0.01 + 0.001 * sum(len(item.tokens) for item in batch) + 0.004 * (len(batch) - 1)


def heads_cost(rows: int) -> float:
    return 0.003 + 0.0002 * rows


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class LazyRunner:
    """A real runner whose work is paid for later, as on CUDA: verify/prefill/commit return at once."""

    def __init__(self, inner: TorchRunner, clock: FakeClock):
        self.inner, self.clock, self.queued = inner, clock, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def enqueue(self, seconds: float) -> None:
        self.clock.now += self.queued  # a launch waits for the work queued before it
        self.queued = seconds

    def synchronize(self) -> None:
        self.clock.now += self.queued
        self.queued = 0.0

    def prefill(self, chunks):
        out = self.inner.prefill(chunks)
        self.enqueue(PREFILL)
        return out

    def verify(self, batch):
        out = self.inner.verify(batch)
        self.enqueue(verify_cost(batch))
        return out

    def commit(self, accepted) -> None:
        self.inner.commit(accepted)
        self.enqueue(COMMIT)


class LazyHeads:
    """Medusa heads whose top-k is queued on the runner's device like its forward passes."""

    hidden_size = 64
    shared_lm_head = False  # carries its own lm_head (FasterDecoding format)

    def __init__(self, runner: LazyRunner):
        self.runner = runner

    def topk(self, hidden, lm_head, k):
        self.runner.enqueue(heads_cost(hidden.shape[0]))
        return torch.zeros(hidden.shape[0], 4, k, dtype=torch.long)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    for module in (calibration, engine_module):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=fake.perf_counter,
                                                                  monotonic=fake.perf_counter))
    return fake


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_calibration_charges_each_shape_its_own_time(model, clock):
    runner = LazyRunner(TorchRunner(model, max_slots=4), clock)
    cost = calibrate(runner, LazyHeads(runner), max_batch=4, max_tree=8, repeats=3, max_tokens=8)
    for n in (1, 2, 3, 4, 8):  # one row of n tokens
        assert cost.points[n] == pytest.approx(0.01 + 0.001 * n), (n, cost.points)
    for t in (1, 2, 3, 4):  # 4 rows of t tokens
        assert cost.measured[(4, t)] == pytest.approx(0.01 + 0.004 * t + 0.012), (t, cost.measured)
    for rows in (1, 4):
        assert cost.heads_points[rows] == pytest.approx(heads_cost(rows)), cost.heads_points
    assert cost(8) > cost(4) > cost(1)  # not inverted


class RecordingCostModel(CostModel):
    def __init__(self):
        super().__init__({1: 0.01}, ema=0.0)
        self.observed: list[tuple[int, int | None, float]] = []

    def observe(self, n_tokens: int, seconds: float, n_rows: int | None = None) -> None:
        self.observed.append((n_tokens, n_rows, seconds))


def test_engine_step_time_is_its_own_forward_and_commit(model, clock):
    """Two requests that start at different steps: a prefill is queued before several decode steps."""
    runner = LazyRunner(TorchRunner(model, max_slots=4), clock)
    recorder = RecordingCostModel()
    engine = Engine(runner, ToyTokenizer(), None, cost_model=recorder)
    first = engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True))
    for _ in range(3):
        engine.step()
    second = engine.submit([9, 10, 11], SamplingParams(max_tokens=6, ignore_eos=True))
    while first.finished is None or second.finished is None:
        engine.step()
    assert len(recorder.observed) >= 8
    for n_tokens, n_rows, seconds in recorder.observed:  # plain steps: one token per row
        expected = 0.01 + 0.001 * n_tokens + 0.004 * (n_rows - 1) + COMMIT
        assert seconds == pytest.approx(expected), (n_tokens, n_rows, seconds, recorder.observed)
    assert engine.counters["step_seconds"] == pytest.approx(sum(s for *_, s in recorder.observed))
