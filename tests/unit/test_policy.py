"""The speculation policy's safety mechanisms (issue 14): per-request shrinkage, the lower confidence
bound, the realized-rate guard, re-measurement on drift, and calibration under bursts of load.

Tiny random Llamas, oracle heads (they know the greedy continuation of registered prompts) and fake
cost models; slow runners are real runners whose `verify` costs a set time. Time is a fake clock
(`time.perf_counter`, what the engine and the calibration read) that only those costs advance: the real
compute adds nothing, so the figures below hold on a loaded 2-core machine and the tests sleep not at all.
"""

from __future__ import annotations

import time

import pytest
import torch
from helpers import OracleHeads, ToyTokenizer, head0_stats, hf_greedy, observed, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.runner import TreeInput
from nbkit.engine.speculation.calibration import calibrate
from nbkit.engine.speculation.costs import CostModel, DeclaredCostModel
from nbkit.engine.speculation.estimates import AcceptanceStats, shrunk_lower_bounds
from nbkit.engine.speculation.guard import SpeculationGuard
from nbkit.engine.speculation.policy import SpeculationPolicy
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.trees import get_tree

CHEAP = CostModel.from_function(lambda n: 0.01)  # the model's belief: trees cost nothing extra
GOOD, BAD = [5, 6, 7, 8, 9], [20] * 30  # both answer 400 tokens without an EOS


class FakeClock:
    """time.perf_counter for the engine and the calibration: it moves only when a fake cost `sleep`s."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def refs(model):
    return {tuple(GOOD): hf_greedy(model, GOOD, 160)}


@pytest.fixture(scope="module")
def oracle(model, refs):
    heads = OracleHeads(model)
    heads.register(GOOD, refs[tuple(GOOD)])
    return heads


class SlowRunner:
    """A real runner whose verification costs `per_step` + `per_token` x (tokens verified) on the clock."""

    def __init__(self, runner: TorchRunner, clock: FakeClock, per_step: float = 0.0, per_token: float = 0.0):
        self.runner, self.clock, self.per_step, self.per_token = runner, clock, per_step, per_token

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def verify(self, batch):
        self.clock.sleep(self.per_step + self.per_token * sum(len(b.tokens) for b in batch))
        return self.runner.verify(batch)


def _policy(q00: float, two_tokens: float) -> SpeculationPolicy:
    stats = head0_stats(q00)
    return SpeculationPolicy(get_tree("mc_sim_7b_63", 4), stats, CostModel({1: 0.010, 2: two_tokens, 4: 0.05}, ema=0.0))



def test_lower_bound_rises_with_a_requests_own_evidence():
    stats = head0_stats(0.5)
    lo = shrunk_lower_bounds(*stats.counts(), [None, observed(20, 0.5), observed(400, 0.5)])[:, 0, 0]
    assert 0.3 < lo[0] < lo[1] < lo[2] < 0.5  # same estimate (0.5), more evidence, tighter bound


def test_few_observations_do_not_clear_the_margin_many_do():
    """1.5 tokens for 1.35x the time: the point estimate clears the margin, its lower bound with no evidence
    of the request's own does not; 400 probes of the request at the same rate do."""
    policy = _policy(0.5, 0.0135)
    policy.record_step(1, 1, 0.010, 0.010, 1, probed=False)  # the guard knows the plain rate: it lets the model decide
    assert policy.plan(1, [None])[0].size == 1
    assert policy.plan(1, [observed(10, 0.5)])[0].size == 1
    tree, use = policy.plan(1, [observed(400, 0.5)])
    assert tree.size > 1 and use == [True]


@pytest.mark.slow
def test_a_request_with_bad_acceptance_stops_while_a_good_one_continues(model):
    refs = {tuple(p): hf_greedy(model, p, 400) for p in (GOOD, BAD)}
    oracle = OracleHeads(model)
    oracle.register(GOOD, refs[tuple(GOOD)])  # BAD is unknown to it: its proposals are random
    engine = Engine(TorchRunner(model, max_slots=2), ToyTokenizer(), oracle, speculation="adaptive", cost_model=CHEAP)
    good, bad = (engine.submit(p, SamplingParams(max_tokens=400)) for p in (GOOD, BAD))
    good_req, bad_req = engine.waiting  # the engine's own records (spec_steps is not in the answer)
    trace = []  # (GOOD speculated, BAD speculated) at each step both ran
    while good.finished is None:
        before = good_req.spec_steps, bad_req.spec_steps
        engine.step()
        if bad_req.steps and good.finished is None:
            trace.append((good_req.spec_steps > before[0], bad_req.spec_steps > before[1]))
    while bad.finished is None:
        engine.step()
    assert good.result().token_ids == refs[tuple(GOOD)] and bad.result().token_ids == refs[tuple(BAD)]
    assert good.finished.mean_accepted > 1.8
    assert any(b for _, b in trace[:10])  # BAD did start: its prior is the (good) global estimate
    # in the second half, GOOD still speculates and BAD, whose own probes show the heads miss it, does not
    late = trace[len(trace) // 2:]
    assert len(late) > 10
    assert sum(g for g, _ in late) >= 0.9 * len(late) and sum(b for _, b in late) <= 0.2 * len(late), late


class SlowHeads(OracleHeads):
    """Oracle heads that take `seconds` per call: dearer than the cost model was told (it priced them at 0)."""

    def __init__(self, oracle: OracleHeads, clock: FakeClock, seconds: float):
        self.__dict__.update(oracle.__dict__)
        self.clock, self.seconds = clock, seconds

    def topk(self, hidden, lm_head, k):
        self.clock.sleep(self.seconds)
        return super().topk(hidden, lm_head, k)


def _learning_cheap() -> CostModel:
    """A measured-looking cost model (it learns from real steps) that thinks trees and heads cost nothing."""
    return CostModel({1: 0.001, 64: 0.001}, heads_cost=0.0, ema=0.1)


def test_guard_backs_off_when_speculation_is_really_slow(model, refs, oracle, clock):
    """The heads really take 20 ms a call, 4x a 5 ms verification, which the cost model never sees (it times
    the verification): the guard sees realized tokens/s of speculative steps far below plain steps and stops
    speculating; the output is unchanged."""
    engine = Engine(SlowRunner(TorchRunner(model, max_slots=1), clock, per_step=0.005), ToyTokenizer(),
                    SlowHeads(oracle, clock, 0.02), speculation="adaptive", cost_model=_learning_cheap())
    out = engine.generate(GOOD, SamplingParams(max_tokens=160))
    assert out.token_ids == refs[tuple(GOOD)]
    guard = engine.speculation.policy.guard
    assert guard.backoffs >= 1 and guard.last_ratio < 1.0, (guard.backoffs, guard.last_ratio)
    spec = sum(n for name, n in engine.speculation.policy.choices.items() if name != "none")
    assert engine.speculation.policy.choices["none"] > 2 * spec, engine.speculation.policy.choices


def test_guard_keeps_speculation_that_pays(model, refs, oracle, clock):
    """Same heads at 2 ms, a runner whose step costs 30 ms whatever its size: trees pay, the guard lets them."""
    slow = SlowRunner(TorchRunner(model, max_slots=1), clock, per_step=0.03)
    engine = Engine(slow, ToyTokenizer(), SlowHeads(oracle, clock, 0.002), speculation="adaptive",
                    cost_model=_learning_cheap())
    out = engine.generate(GOOD, SamplingParams(max_tokens=160))
    assert out.token_ids == refs[tuple(GOOD)]
    guard = engine.speculation.policy.guard
    assert guard.backoffs == 0 and guard.last_ratio > 1.0, (guard.backoffs, guard.last_ratio)
    assert out.mean_accepted > 1.8


def test_guard_judges_through_bursts_of_load():
    """Speculative steps that give 1.5 tokens for 1.2x a plain step's time, 3 of 16 of them hit by a 10x
    burst: the mean time would call that a loss, the guard does not; the same steps at 1.6x are a loss."""
    for cost, loses in ((1.2, False), (1.6, True)):
        guard = SpeculationGuard()
        for step in range(9):
            guard.record(step, 1, False, 1, 0.010, probed=False)
        for step in range(9, 25):
            seconds = 0.010 * cost * (10 if step % 5 == 0 else 1)
            guard.record(step, 1, True, 1 if step % 2 else 2, seconds, probed=False)
        assert (guard.backoffs > 0) == loses, (cost, guard.last_ratio)
        assert guard.allows(25) != loses


def test_drift_triggers_an_interleaved_remeasurement(model, refs, oracle, clock):
    """Calibrated at 0.1 ms per step, the machine then takes ~3 ms: after the drift window the engine
    alternates plain and tree steps for a few rounds and installs their medians."""
    cost = CostModel({1: 0.0001, 2: 0.0001, 64: 0.0001}, ema=0.1)
    cost.measured.update({(1, 1): 0.0001, (1, 2): 0.0001})
    cost.set_reference()
    slow = SlowRunner(TorchRunner(model, max_slots=1), clock, per_step=0.003)
    engine = Engine(slow, ToyTokenizer(), oracle, speculation="adaptive", cost_model=cost)
    order, plan = [], engine.speculation.policy.plan

    def spy(*args):
        tree, use = plan(*args)
        order.append((engine.speculation.policy._remeasuring, tree.size))
        return tree, use

    engine.speculation.policy.plan = spy
    out = engine.generate(GOOD, SamplingParams(max_tokens=160))
    assert out.token_ids == refs[tuple(GOOD)]
    assert engine.speculation.policy.remeasure.count == 1
    assert cost.step(1, 1) == pytest.approx(0.003)  # the medians replaced the stale 0.1 ms
    sizes = [size for remeasuring, size in order if remeasuring]
    assert sizes[0] == 1 and sizes[1] > 1 and sizes.count(1) == 3  # plain first, then trees, 3 rounds


def test_a_declared_price_list_is_taken_as_given_a_measured_one_is_guarded():
    """The same prices, declared or measured, and speculative steps that really lose (1 token for 2x a plain
    step's time): the measured model's guard backs off to plain steps, the declared one's never intervenes."""
    prices = {1: 0.010, 2: 0.0105, 4: 0.011, 64: 0.02}
    for cost, guarded in ((DeclaredCostModel(prices), False), (CostModel(prices, ema=0.1), True)):
        stats = AcceptanceStats(4, measured=[[0.9] + [0.0] * 9] + [[0.0] * 10] * 3)
        policy = SpeculationPolicy(get_tree("mc_sim_7b_63", 4), stats, cost)
        own = observed(400, 0.9)
        for _ in range(9):
            policy.plan(1, [own])
            policy.record_step(1, 1, 0.010, 0.010, 1, probed=False)
        trees = []
        for _ in range(30):
            tree, _use = policy.plan(1, [own])
            trees.append(tree.size)
            policy.record_step(1, tree.size, 0.020, 0.020, 1, probed=False)
        assert trees[0] > 1, trees
        assert (policy.snapshot()["guard_backoffs"] > 0) == guarded, (cost, policy.snapshot())
        assert (trees[-1] == 1) == guarded, trees


class BurstyRunner:
    """A fake runner: verify costs 1 ms per token, plus 30 ms during a burst of calls 12..20 (timed one size
    after the other, size 2 would get five of its seven runs in the burst)."""

    device, dtype, max_slots = torch.device("cpu"), torch.float32, 4

    def __init__(self, clock: FakeClock):
        self.clock, self.calls, self.free_slots = clock, 0, [0, 1, 2, 3]

    def alloc(self):
        return self.free_slots.pop()

    def free(self, slot):
        self.free_slots.append(slot)

    def prefill(self, chunks):
        return {}

    def synchronize(self):  # its work is done when verify returns
        pass

    def verify(self, batch: list[TreeInput]):
        self.calls += 1
        self.clock.sleep(0.001 * sum(len(b.tokens) for b in batch) + (0.03 if 12 <= self.calls <= 20 else 0.0))
        return {}


def test_calibration_medians_over_interleaved_rounds_survive_a_burst(clock):
    cost = calibrate(BurstyRunner(clock), None, max_batch=1, max_tree=8, repeats=7, max_tokens=8)
    for n in (1, 2, 4, 8):  # the burst hit every size in two of its seven rounds at most: medians ignore it
        assert cost(n) == pytest.approx(0.001 * n), (n, cost(n))
    assert cost(8) > cost(1)


class RowsRunner(BurstyRunner):
    """A fake runner whose cost is not linear in rows: one row pays 1.7x for a second token, while up to 4 rows
    cost what one does and a second token adds 10%; past 4 rows the cost grows with the rows."""

    max_slots = 16

    def __init__(self, clock: FakeClock):
        self.clock, self.calls, self.free_slots = clock, 0, list(range(16))

    def verify(self, batch: list[TreeInput]):
        rows, t = len(batch), max(len(b.tokens) for b in batch)
        extra = 0.7 if rows == 1 else 0.1
        self.clock.sleep(0.002 * max(1.0, rows / 4) * (1 + extra * min(t - 1, 1) + 0.1 * max(t - 2, 0)))
        return {}


def test_calibration_times_a_middle_batch_size_so_it_is_not_interpolated(clock):
    """Interpolating between 1 and 16 rows would price a 4 x 2 step at ~1.4x a 4 x 1 one; calibrated, it is 1.1x."""
    cost = calibrate(RowsRunner(clock), None, max_batch=16, max_tree=4, repeats=3, max_tokens=16)
    assert {(4, t) for t in (1, 2, 3, 4)} <= set(cost.measured)
    assert cost.step(4, 2) / cost.step(4, 1) == pytest.approx(1.1)
    assert cost.step(1, 2) / cost.step(1, 1) == pytest.approx(1.7)
