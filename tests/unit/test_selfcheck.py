"""The start-up self-check (issue 22): decoding checked lossless on the device that serves, or a mode that is.

Tiny random Llamas with random heads (the check forces the reference continuation on the tree's paths, so
head quality does not matter). Broken runners stand in for device bugs: a tree mask bug (the logits of
non-root tree nodes perturbed), wrong tree positions, a batch bug; each must FAIL the check and make the
engine serve in a mode that passed. Float noise deciding a near-tie must be reported and pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import NonRootNoise, RunnerWrapper, ToyTokenizer, hf_greedy, random_heads, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.selfcheck import PROMPTS, check_runner
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.engine.warmup import warm_up, warming_up

CHEAP = CostModel.from_function(lambda n: 0.01)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def heads(model):
    return random_heads(model)


def engine_on(runner, heads, **kw) -> Engine:
    return Engine(runner, ToyTokenizer(), heads, cost_model=CHEAP, self_check=True, **kw).prepare()


class WrongPositions(TorchRunner):
    """Tree nodes at consecutive positions, as if the tree were one chain (siblings get different positions)."""

    def verify(self, batch):
        batch = [dataclasses.replace(it, tree=dataclasses.replace(it.tree, depths=torch.arange(it.tree.size)))
                 for it in batch]
        return super().verify(batch)


class BatchBug(RunnerWrapper):
    """Rows verified together perturb each other (a KV or padding bug that only shows in a batch)."""

    def verify(self, batch):
        out = self.inner.verify(batch)
        if len(batch) > 1:
            out = {s: (logits + 0.5 * torch.sin(torch.arange(logits.shape[-1]) * 1.0), h) for s, (logits, h) in out.items()}
        return out


class NearTie(RunnerWrapper):
    """Float noise that decides a near-tie: at one position, plain steps see the top-2 tokens `delta` apart;
    tree steps see them swapped. Everything else is exact."""

    def __init__(self, inner, position: int, delta: float = 1e-4):
        super().__init__(inner)
        self.position, self.delta = position, delta

    def _tie(self, row: torch.Tensor, swap: bool) -> None:
        first, second = row.topk(2).indices.tolist()
        with torch.inference_mode():  # the runner's outputs are inference tensors
            row[second] = row[first] + (self.delta if swap else -self.delta)

    def prefill(self, chunks):
        starts = {s: self.inner.length(s) for s in chunks}
        out = self.inner.prefill(chunks)
        for s, chunk in chunks.items():
            if starts[s] + len(chunk) - 1 == self.position:
                self._tie(out[s][0], swap=False)
        return out

    def verify(self, batch):
        starts = {it.slot: self.inner.length(it.slot) for it in batch}
        out = self.inner.verify(batch)
        for it in batch:
            logits = out[it.slot][0]
            for node, depth in enumerate(it.tree.depths.tolist()):
                if starts[it.slot] + depth == self.position:
                    self._tie(logits[node], swap=it.tree.size > 1)
        return out


def test_passes_on_the_tiny_model_with_and_without_heads(model, heads):
    engine = engine_on(TorchRunner(model, max_slots=4), heads)
    check = engine.limits().self_check
    assert check["passed"] and check["served"] == "adaptive" and check["fallback"] is None, check
    assert set(check["runs"]) == {"plain_batched", "tree_alone", "tree_batched"}
    assert all(r["positions"] >= 10 for r in check["runs"].values()), check
    assert check["max_abs_diff"] <= check["tolerance"] and check["argmax_agrees"] and check["tokens_equal"]
    assert check["tree"] == engine.base_tree.name and not check["cached"]

    plain = engine_on(TorchRunner(model, max_slots=4), None)
    assert set(plain.self_check.runs) == {"plain_batched"} and plain.self_check.passed
    assert plain.self_check.tree == "none"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_passes_in_half_precision(dtype):
    model = tiny_llama().to(dtype)
    check = check_runner(TorchRunner(model, max_slots=2), random_heads(model).to(dtype), None, [[5, 6, 7, 8], [9, 10]])
    assert check.passed, check.to_dict()


@pytest.mark.parametrize("broken", ["mask", "positions"])
def test_a_tree_bug_fails_and_speculation_goes_off(model, heads, broken):
    runner = NonRootNoise(TorchRunner(model, max_slots=4)) if broken == "mask" else WrongPositions(model, max_slots=4)
    engine = engine_on(runner, heads)
    check = engine.limits().self_check
    assert not check["passed"] and check["max_abs_diff"] > check["tolerance"], check
    assert check["runs"]["plain_batched"]["passed"] and not check["runs"]["tree_alone"]["passed"]
    assert check["served"] == "off" and "speculation off" in check["fallback"], check
    assert engine.limits().speculation == "off" and engine.limits().max_batch == 4
    with pytest.raises(ValueError, match="self-check"):
        engine.submit([5, 6, 7], SamplingParams(max_tokens=4, tree="mc_sim_7b_63"))
    prompt = [5, 6, 7, 8, 9]
    out = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    assert out.token_ids == hf_greedy(model, prompt, 12) and out.mean_accepted == 1.0  # served plain, right


def test_a_batch_bug_fails_and_the_engine_serves_one_request_at_a_time(model, heads):
    engine = engine_on(BatchBug(TorchRunner(model, max_slots=4)), heads)
    check = engine.limits().self_check
    assert not check["passed"] and not check["runs"]["plain_batched"]["passed"], check
    assert engine.limits().max_batch == 1 and "one request at a time" in check["fallback"]


def test_a_near_tie_decided_by_noise_is_reported_and_passes(model, heads):
    position = len(ToyTokenizer()(PROMPTS[0])["input_ids"]) + 2
    engine = engine_on(NearTie(TorchRunner(model, max_slots=4), position), heads)
    check = engine.limits().self_check
    assert check["passed"] and check["served"] == "adaptive", check
    assert check["near_ties"] >= 1 and not check["tokens_equal"] and check["argmax_agrees"], check
    assert check["runs"]["tree_alone"]["near_ties"] == 1, check


def test_a_near_tie_beyond_the_noise_is_a_failure(model, heads):
    """The same swap with a margin far beyond the noise: a real disagreement."""
    position = len(ToyTokenizer()(PROMPTS[0])["input_ids"]) + 2
    engine = engine_on(NearTie(TorchRunner(model, max_slots=4), position, delta=2.0), heads)
    check = engine.limits().self_check
    assert not check["passed"] and not check["argmax_agrees"] and check["served"] == "off", check


def test_info_reports_the_failed_check_and_the_mode_served(model, heads):
    import httpx

    from nbkit.server.launch import start_server

    engine = Engine(NonRootNoise(TorchRunner(model, max_slots=4)), ToyTokenizer(), heads, cost_model=CHEAP,
                    self_check=True, model_name="tiny")
    handle = start_server(engine, port=0)
    try:
        info = httpx.get(f"{handle.url}/info").json()
    finally:
        handle.stop()
    check = info["self_check"]
    assert check["passed"] is False and check["served"] == "off" and info["speculation"] == "off", info
    assert check["runs"]["tree_alone"]["passed"] is False and check["device"] == "cpu" and check["positions"] > 0


# ---- a first start that checks the tree while serving (warmup.py) ----------------------------------------
def _drive(engine: Engine, prompt: list[int], params: SamplingParams):
    handle = engine.submit(prompt, params)
    while handle.finished is None:
        engine.step()
    return handle.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_while_serving_plain_decoding_is_checked_first_and_the_tree_in_idle_time_before_any_request_uses_it(dtype):
    model = tiny_llama().to(dtype)
    engine = Engine(TorchRunner(model, max_slots=4), ToyTokenizer(), random_heads(model).to(dtype), self_check=True)
    engine.prepare(while_serving=True)
    check = engine.limits().self_check
    assert check["pending"] and check["passed"] and set(check["runs"]) == {"plain_batched"}, check
    assert warming_up(engine) and engine.limits().calibration == "measuring"
    prompt, params = [5, 6, 7, 8, 9], SamplingParams(max_tokens=10, ignore_eos=True, tree="mc_sim_7b_63")
    before = _drive(engine, prompt, params)  # names a tree, which is not checked yet: decoded plainly
    assert engine.counters["spec_steps"] == 0 and before.token_ids == hf_greedy(model, prompt, 10)

    warm_up(engine, lambda: False)  # the idle time: the tree's runs, then the calibration
    check = engine.limits().self_check
    assert not warming_up(engine) and not check["pending"] and check["passed"], check
    assert {"plain_batched", "tree_alone", "tree_batched"} == set(check["runs"]) and check["tree"] == "mc_sim_7b_63"
    assert engine.limits().calibration == "measured"
    after = _drive(engine, prompt, params)
    assert engine.counters["spec_steps"] > 0 and after.token_ids == before.token_ids


def test_while_serving_a_tree_bug_found_in_idle_time_turns_speculation_off_and_ends_the_warm_up(model, heads):
    engine = Engine(WrongPositions(model, max_slots=4), ToyTokenizer(), heads, self_check=True)
    engine.prepare(while_serving=True)
    assert engine.limits().self_check["passed"] and engine.limits().self_check["pending"]
    calls = {"n": 0}

    def after_one_unit() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    warm_up(engine, after_one_unit)  # yields between units: still pending
    assert warming_up(engine) and engine.limits().self_check["pending"]
    warm_up(engine, lambda: False)
    check = engine.limits().self_check
    assert not check["passed"] and check["served"] == "off" and not check["runs"]["tree_alone"]["passed"], check
    assert not warming_up(engine) and engine.limits().calibration == "none" and engine.limits().speculation == "off"
    with pytest.raises(ValueError, match="self-check"):
        engine.submit([5, 6, 7], SamplingParams(max_tokens=4, tree="mc_sim_7b_63"))
