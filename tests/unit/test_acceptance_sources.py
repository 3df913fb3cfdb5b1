"""nbkit.bench.acceptance (python -m nbkit.bench.acceptance): per-source acceptance and head accuracy, on a tiny model and random heads."""

from __future__ import annotations

import pytest
from helpers import ToyTokenizer, random_heads, tiny_llama

from nbkit.bench import acceptance
from nbkit.engine.engine import Engine
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner


@pytest.fixture(scope="module")
def script():
    return acceptance


def test_measure_reports_acceptance_and_head_accuracy_per_source(script):
    model = tiny_llama()
    cost = CostModel.from_function(lambda n: 0.01 + 0.001 * n)
    engine = Engine(TorchRunner(model, max_slots=4), ToyTokenizer(), random_heads(model), speculation="mc_sim_7b_63",
                    max_batch=4, max_queue=64, cost_model=cost)
    plain = Engine(engine.runner.fresh(), engine.tokenizer, None, speculation="off", max_queue=64, cost_model=cost)
    for prompts in (["hello there", "write a poem"], ["another source", "b", "c"]):  # engines restart per source
        ids = [engine.encode(p, chat=True) for p in prompts]
        out = script.measure(engine, plain, model, ids, max_tokens=12)
        assert out["prompts"] == len(prompts)
        assert out["outputs_differing_from_plain"] == 0  # greedy Medusa is lossless
        assert out["steps"] > 0 and out["tokens"] >= out["steps"] and out["accepted_per_step"] >= 1.0
        assert len(out["head_top1"]) == 4 and len(out["head_top10"]) == 4
        assert all(0.0 <= t1 <= t10 <= 1.0 for t1, t10 in zip(out["head_top1"], out["head_top10"]))
        assert out["positions"] > 0
        # the simulation on the plain answers agrees with real decoding (up to bf16 near-ties)
        assert abs(out["simulated_per_step"] - out["accepted_per_step"]) < 0.05, out


def test_measure_heads_compares_several_heads_on_one_reference(script, tmp_path):
    model = tiny_llama()
    cost = CostModel.from_function(lambda n: 0.01 + 0.001 * n)
    runner = TorchRunner(model, max_slots=4)
    engines = {name: Engine(runner.fresh(), ToyTokenizer(), random_heads(model, seed=seed), speculation="mc_sim_7b_63",
                            max_batch=4, max_queue=64, cost_model=cost) for name, seed in (("a", 0), ("b", 1))}
    plain = Engine(runner.fresh(), ToyTokenizer(), None, speculation="off", max_queue=64, cost_model=cost)
    ids = [engines["a"].encode(p, chat=True) for p in ("hello there", "write a poem", "c")]
    out = script.measure_heads(engines, plain, model, ids, max_tokens=12, cache=tmp_path / "src")
    assert set(out) == {"a", "b"}
    for figures in out.values():
        assert figures["outputs_differing_from_plain"] == 0 and figures["accepted_per_step"] >= 1.0
        assert figures["positions"] == out["a"]["positions"] > 0  # the same plain answers for every heads
    # a later run reuses the cached plain answers and features: no plain engine needed
    again = script.measure_heads({"b": engines["b"]}, None, model, ids, max_tokens=12, simulate=True,
                                 cache=tmp_path / "src")
    assert again["b"]["simulated_per_step"] == out["b"]["simulated_per_step"]
    assert again["b"]["head_top1"] == out["b"]["head_top1"] and "accepted_per_step" not in again["b"]
