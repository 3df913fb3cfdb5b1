"""The torch runner's KV cache within the plan's budget, and growth that is all or nothing."""

import pytest
import torch
from helpers import ToyTokenizer, hf_greedy, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner

CHEAP = CostModel.from_function(lambda n: 0.01)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=4, vocab_size=64, hidden=32, max_positions=2048)


def per_position(model) -> int:
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4


def test_the_kv_cache_is_allocated_once_within_the_budget(model):
    """The old runner took no budget: 16 rows x the longest request's capacity, grown by doubling."""
    budget = 4 * 300 * per_position(model) + 1000
    runner = TorchRunner(model, max_slots=4, kv_budget_bytes=budget)
    assert runner.max_context == 299  # + one scratch column where a ragged prefill's padding writes
    engine = Engine(runner, ToyTokenizer(64), None, cost_model=CHEAP)
    engine.eos_ids = set()
    prompts = [[5 + i, 9] * (20 + 25 * i) for i in range(4)]  # ragged prefills: the padding hits the end
    handles = [engine.submit(p, SamplingParams(max_tokens=60)) for p in prompts]
    sizes = set()
    while not all(h.finished for h in handles):
        engine.step()
        sizes.add(runner.kv_bytes())
    assert [h.result().token_ids for h in handles] == [hf_greedy(model, p, 60) for p in prompts]
    assert sizes == {4 * 300 * per_position(model)} and runner.kv_bytes() <= budget  # allocated once


def test_limits_say_what_the_budget_holds_and_a_longer_request_is_refused_with_the_numbers(model):
    runner = TorchRunner(model, max_slots=4, kv_budget_bytes=4 * 300 * per_position(model))
    engine = Engine(runner, ToyTokenizer(64), None, cost_model=CHEAP)
    assert engine.limits().max_total_tokens == 299 - engine.tree_reserve
    with pytest.raises(ValueError, match=r"prompt \(250 tokens\) \+ max_tokens \(100\) exceeds the context limit"):
        engine.submit([5] * 250, SamplingParams(max_tokens=100))


def test_a_fresh_runner_shares_the_budget_among_its_own_slots(model):
    runner = TorchRunner(model, max_slots=4, kv_budget_bytes=4 * 300 * per_position(model))
    assert runner.fresh(max_slots=2).max_context == 599 and runner.fresh().max_context == 299


def test_a_budget_too_small_for_a_useful_slot_is_refused_at_start(model):
    with pytest.raises(ValueError, match=r"holds 10 positions per slot \(16 slots"):
        TorchRunner(model, max_slots=16, kv_budget_bytes=16 * 10 * per_position(model))


def test_a_failed_growth_leaves_every_layer_as_it_was_and_the_runner_serving(model, monkeypatch):
    """The old runner replaced layers one by one: an out-of-memory at layer 2 left layer 1 grown and
    layer 2 not, and every later growth failed (its copy no longer matched)."""
    runner = TorchRunner(model, max_slots=2, initial_capacity=64)
    engine = Engine(runner, ToyTokenizer(64), None, cost_model=CHEAP)
    assert engine.generate([7] * 30, SamplingParams(max_tokens=4)).error is None  # capacity 64
    real_alloc, calls = runner._alloc, []

    def alloc_failing_at_layer_2(capacity):
        calls.append(capacity)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_alloc(capacity)

    monkeypatch.setattr(runner, "_alloc", alloc_failing_at_layer_2)
    failed = engine.generate([9] * 100, SamplingParams(max_tokens=4))
    assert failed.finish_reason == "error" and "stays at 64 positions" in failed.error
    assert {tuple(layer.keys.shape) for layer in runner.cache.layers} == {(2, 2, 64, 8)}
    assert runner.capacity == 64
    monkeypatch.setattr(runner, "_alloc", real_alloc)
    prompt = [11] * 150  # needs a growth again
    assert engine.generate(prompt, SamplingParams(max_tokens=8)).token_ids == hf_greedy(model, prompt, 8)


def test_nbkit_serve_passes_its_kv_budget_to_the_engine(monkeypatch):
    """`nbkit serve --kv-budget-gib 1.5` reaches start_server (then load_engine, then the runner) in bytes."""
    import argparse

    from nbkit.server import cli, launch

    seen = {}

    def fake_start_server(**kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before anything loads

    monkeypatch.setattr(launch, "start_server", fake_start_server)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # pytest keeps its own Ctrl-C handling
    parser = argparse.ArgumentParser()
    cli.register_cli(parser.add_subparsers())
    args = parser.parse_args(["serve", "--kv-budget-gib", "1.5"])
    assert args.func(args) == 130
    assert seen["kv_budget_bytes"] == int(1.5 * 2**30)
    args = parser.parse_args(["serve"])
    args.func(args)
    assert seen["kv_budget_bytes"] is None
