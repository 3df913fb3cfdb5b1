"""What the policy prices beyond the verification pass itself: tokens a runner decodes again (llama.cpp's
exact mode re-decodes accepted speculative tokens next step), re-measurement limited to trees that could
pay, and a runner that has no hidden state after prefill (the request's heads start one step later)."""

from __future__ import annotations

import torch
from helpers import OracleHeads, ToyTokenizer, head0_stats, hf_greedy, observed, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation.costs import CostModel
from nbkit.engine.speculation.policy import SpeculationPolicy
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.trees import get_tree

PROMPT = [5, 6, 7, 8, 9]


def _policy(q00: float, points: dict[int, float], recomputes: bool = False) -> SpeculationPolicy:
    stats = head0_stats(q00)
    return SpeculationPolicy(get_tree("mc_sim_7b_63", 4), stats, CostModel(points, ema=0.1),
                             recomputes_accepted=recomputes)



def test_a_tree_is_priced_with_the_tokens_the_runner_decodes_again():
    """1.9 tokens for 1.4x a plain step pays; decoding the 0.9 accepted token again next step (curve: a third
    token costs a full step more) does not."""
    points = {1: 0.010, 2: 0.014, 3: 0.024, 4: 0.034, 64: 0.64}
    for recomputes, speculates in ((False, True), (True, False)):
        policy = _policy(0.9, points, recomputes)
        policy.record_step(1, 1, 0.010, 0.010, 1, probed=False)  # the guard knows the plain rate
        tree, use = policy.plan(1, [observed(400, 0.9)])
        assert (tree.size > 1) == speculates and use == [speculates], (recomputes, tree.name)


def _drifted_queue(points: dict[int, float]) -> list[int]:
    """The tree sizes a re-measurement queues after step times drift 5x (acceptance: head 0's top-1 at 0.5)."""
    policy = _policy(0.5, points)
    policy.record_step(1, 1, 0.010, 0.010, 1, probed=False)
    for _ in range(32):  # the drift shows on 64-token steps, so the small shapes keep their prices
        policy.cost.observe(64, 5 * points[64], n_rows=1)
    policy.plan(1, [None])
    assert policy.remeasure.count == 0 and policy.remeasure.active
    return [policy.last_choice.size] + [t.size for t in policy.remeasure.queue]


def test_remeasurement_leaves_out_trees_that_cannot_pay():
    """Where two tokens cost 4x one (llama.cpp on a CPU), no tree can pay at 1.5 tokens a step: only plain
    steps are re-measured. Where trees are cheap, the small ones are re-measured too."""
    dear = _drifted_queue({1: 0.010, 2: 0.040, 4: 0.050, 64: 0.5})
    assert dear == [1, 1, 1]
    cheap = _drifted_queue({1: 0.010, 2: 0.0105, 4: 0.011, 64: 0.02})
    assert cheap.count(1) == 3 and {2, 3, 5} <= set(cheap)


def test_a_burst_of_load_moves_every_price_alike():
    """Plain steps, the only ones running, take twice their calibrated time for a while: every shape's price
    follows (the heads' too), so a tree is still priced at what it costs next to a plain step."""
    cost = CostModel({1: 0.010, 2: 0.017, 4: 0.021, 64: 0.3}, heads_cost={1: 0.002}, ema=0.1)
    cost.measured.update({(1, 1): 0.010, (1, 2): 0.017})
    cost.set_reference()
    before = [cost.step(1, t) / cost.step(1, 1) for t in (2, 3, 5)] + [cost.heads(1) / cost.step(1, 1)]
    for _ in range(60):
        cost.observe(1, 0.020, n_rows=1)
    assert abs(cost.step(1, 1) / 0.020 - 1) < 0.05
    after = [cost.step(1, t) / cost.step(1, 1) for t in (2, 3, 5)] + [cost.heads(1) / cost.step(1, 1)]
    assert all(abs(a / b - 1) < 0.05 for a, b in zip(after, before)), (before, after)
    for _ in range(60):  # and back
        cost.observe(1, 0.010, n_rows=1)
    assert abs(cost.step(1, 2) / 0.017 - 1) < 0.05


def test_a_tree_shape_learns_its_price_next_to_plain_steps():
    """Calibrated at 1.7x a plain step, two tokens really cost 2.5x: seen beside plain steps, the price moves
    there while the plain step keeps its own."""
    cost = CostModel({1: 0.010, 2: 0.017, 64: 0.3}, ema=0.1)
    cost.measured.update({(1, 1): 0.010, (1, 2): 0.017})
    cost.set_reference()
    for _ in range(80):
        cost.observe(1, 0.010, n_rows=1)
        cost.observe(2, 0.025, n_rows=1)
    assert 2.0 < cost.step(1, 2) / cost.step(1, 1) < 2.6  # from 1.7, most of the way in 80 pairs
    assert abs(cost.step(1, 1) / 0.010 - 1) < 0.15


def test_no_tree_becomes_reachable_because_the_machine_slowed_down():
    """Two tokens cost 1.7x one and head 0 hits half the time (1.5 tokens a step): no tree can pay, before or
    during a burst of load that only plain steps saw."""
    policy = _policy(0.5, {1: 0.010, 2: 0.017, 4: 0.021, 8: 0.024, 64: 0.3})
    policy.cost.measured.update({(1, 1): 0.010, (1, 2): 0.017, (1, 4): 0.021})
    policy.cost.set_reference()
    assert policy._reachable(1) == set()
    for _ in range(60):
        policy.cost.observe(1, 0.025, n_rows=1)
    policy._reach.clear()
    assert policy._reachable(1) == set()


def test_a_plain_step_that_decodes_accepted_tokens_again_is_speculations_cost():
    policy = _policy(0.5, {1: 0.010, 2: 0.014, 64: 0.64})
    policy.record_step(1, 1, 0.013, 0.013, 1, probed=False, carried=1)
    assert policy.guard.plain_seconds(1) is None and len(policy.guard.window) == 1
    policy.record_step(1, 1, 0.010, 0.010, 1, probed=False)
    assert policy.guard.plain_seconds(1) == 0.010


class NoPrefillHidden:
    """A real runner whose prefill returns an empty hidden state (as llama.cpp's does)."""

    def __init__(self, runner: TorchRunner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def prefill(self, chunks):
        return {slot: (logits, torch.empty(0)) for slot, (logits, _) in self.runner.prefill(chunks).items()}


def test_heads_start_at_the_first_verify_step_when_prefill_gives_no_hidden_state():
    model = tiny_llama()
    ref = hf_greedy(model, PROMPT, 40)
    heads = OracleHeads(model)
    heads.register(PROMPT, ref)
    engine = Engine(NoPrefillHidden(TorchRunner(model, max_slots=1)), ToyTokenizer(), heads,
                    speculation="mc_sim_7b_63")
    handle = engine.submit(PROMPT, SamplingParams(max_tokens=40))
    (req,) = engine.waiting
    trace = []  # (decoding steps, of which speculative) after each engine step
    while handle.finished is None:
        engine.step()
        trace.append((req.steps, req.spec_steps))
    assert handle.result().token_ids == ref
    decoding = [spec for steps, spec in trace if steps > 0]
    # the first decoding step has no hidden state for the heads: plain; every later one verified the tree
    assert len(decoding) > 2 and decoding == list(range(len(decoding))), trace


def test_probes_are_rarer_where_no_tree_could_pay():
    """Heads at 10% of a plain step: probes take 1% of decoding while trees are within reach, a quarter of
    that where two tokens cost 4x one."""
    counts = []
    for points in ({1: 0.010, 2: 0.0105, 4: 0.011, 64: 0.02}, {1: 0.010, 2: 0.040, 4: 0.050, 64: 0.5}):
        stats = head0_stats(0.5)
        policy = SpeculationPolicy(get_tree("mc_sim_7b_63", 4), stats, CostModel(points, heads_cost=0.001))
        counts.append(sum(policy.probe_due(step, 1) for step in range(4000)))
    assert counts == [400, 100]  # every 10th step (10% x 1/10 = 1%), every 40th
