"""Speculation as one component: plan(running) -> StepPlan, record(StepResult); its caches are its own."""

from types import SimpleNamespace

import pytest
from helpers import random_heads, tiny_llama

from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel, Speculation, StepResult

CHEAP = CostModel.from_function(lambda n: 0.01)


@pytest.fixture(scope="module")
def heads():
    return random_heads(tiny_llama())


def request(spec: Speculation, rid: int, ready: bool = True, **params):
    return SimpleNamespace(id=rid, params=SamplingParams(**params), heads_ready=ready,
                           acceptance=spec.new_request())


def test_a_fixed_tree_runs_where_the_heads_are_ready_and_the_rest_decode_plainly(heads):
    spec = Speculation(heads, mode="chain-2", cost_model=CHEAP)
    running = [request(spec, 1), request(spec, 2, ready=False), request(spec, 3, speculate=True, tree="none")]
    plan = spec.plan(running, n_active=3)
    assert plan.chosen.name == "chain-2"
    assert [plan.trees[r.id].size for r in running] == [3, 1, 1]
    assert [r.id for r in plan.heads_rows(running)] == [1]  # no probes outside adaptive mode
    assert spec.largest_tree() == spec.base_tree.size  # the published tree is the largest the engine may pick


def test_without_heads_speculation_is_off_and_every_tree_is_root_only():
    spec = Speculation(None, mode="adaptive")
    running = [SimpleNamespace(id=1, params=SamplingParams(), heads_ready=False, acceptance=None)]
    plan = spec.plan(running, 1)
    assert spec.mode == "off" and plan.trees[1].size == 1 and not plan.probe
    with pytest.raises(ValueError):
        Speculation(None, mode="chain-2")


def test_record_feeds_the_statistics_and_the_policy_keeps_its_caches_to_itself(heads):
    spec = Speculation(heads, mode="adaptive", cost_model=CHEAP)
    running = [request(spec, i) for i in range(3)]
    spec.plan(running, 3)
    assert all(not hasattr(r.acceptance, "gains") and not hasattr(r.acceptance, "cache_key") for r in running)
    steps = spec.policy.steps
    spec.record(StepResult(rows=3, tree_size=4, verify_seconds=0.01, seconds=0.012, tokens=5, probed=False,
                           proposed=9, accepted=2))
    assert (spec.stats.proposed, spec.stats.accepted, spec.policy.steps) == (9, 2, steps + 1)
    snap = spec.snapshot()
    assert snap["speculation"] == "adaptive" and snap["proposed_tokens"] == 9 and "tree_choices" in snap
