"""`python -m nbkit bench --prompts`: one concurrency x speculation grid per prompt source (tiny engines)."""

from __future__ import annotations

import pytest
from helpers import ToyTokenizer, random_heads, tiny_llama

from nbkit.bench.closed_loop import bench_prompts, run_sources
from nbkit.cli import main
from nbkit.engine.engine import Engine
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.prompts import EXTRA_EVAL_PROMPTS, held_out_prompts, source_prompts


@pytest.fixture(scope="module")
def make_engine():
    model = tiny_llama()
    heads = random_heads(model)
    engines = []

    def make(speculation, static_batching, max_batch):
        assert not static_batching  # the mixed workload is off in these tests
        engine = Engine(TorchRunner(model, max_slots=max_batch), ToyTokenizer(), heads, speculation=speculation,
                        max_batch=max_batch, max_queue=64, cost_model=CostModel.from_function(lambda n: 0.01 + 0.001 * n))
        engines.append(engine)
        return engine.start()

    yield make
    for engine in engines:
        engine.stop()


def test_bench_prompts_come_from_the_named_source():
    tok = ToyTokenizer()
    hand = bench_prompts(tok, 3, source="handwritten")
    assert hand == [tok.apply_chat_template([{"role": "user", "content": p}]) for p in EXTRA_EVAL_PROMPTS[:3]]
    templates = bench_prompts(tok, 3, source="templates")
    held = source_prompts("templates")[1]  # the held-out half, in the source's own order (not a public file)
    assert len(held) >= 3 and templates == [tok.apply_chat_template([{"role": "user", "content": p}])
                                             for p in held[:3]]
    assert templates != hand and held_out_prompts("templates", 3) == held[:3]


def test_run_sources_reports_each_source_side_by_side(make_engine):
    seen = []
    result = run_sources(make_engine, ToyTokenizer(), ["templates", "handwritten"], log=seen.append,
                         concurrencies=(1, 2), speculations=("off", "adaptive"), max_tokens=4,
                         requests_per_client=1, min_requests=2, mixed=False, n_prompts=4)
    assert set(result["by_source"]) == {"templates", "handwritten"}
    assert result["prompts"] == "templates" and result["runs"] == result["by_source"]["templates"]["runs"]
    for source, ratios in result["per_source"].items():
        # totals, and the median of the per-round ratios (each of the 2 rounds ran both back to back)
        assert set(ratios) == {f"adaptive_over_off_c{c}{s}" for c in (1, 2) for s in ("", "_round_median")}, source
        assert all(v > 0 for v in ratios.values())
    for r in result["by_source"]["handwritten"]["runs"]:
        assert r["requests"] == 2 and r["output_tokens"] > 0
        assert len(r["round_tokens_per_s"]) == 2 and all(v > 0 for v in r["round_tokens_per_s"])
    assert sum("handwritten" in line for line in seen) == 4  # 2 concurrencies x 2 speculations


def test_bench_cli_rejects_an_unknown_or_missing_source_before_loading_a_model(capsys, tmp_path, monkeypatch):
    assert main(["bench", "--prompts", "templates,mt_bench", "--out", str(tmp_path)]) == 2
    assert "unknown prompt source" in capsys.readouterr().out
    monkeypatch.setenv("NBKIT_PROMPTS_DIR", str(tmp_path))
    assert main(["bench", "--prompts", "user_oriented", "--out", str(tmp_path)]) == 2
    assert "docs/bench/sources.md" in capsys.readouterr().out


def test_off_and_adaptive_alternate_in_rounds_on_the_same_prompts(make_engine):
    """--rounds: off, adaptive, adaptive, off; each round serves the same prompts to both settings."""
    from nbkit.bench.closed_loop import interleaved

    calls, prompts = [], [[5, 6, 7], [8, 9], [10, 11, 12], [13]]

    def recording(speculation, static_batching, max_batch):
        engine = make_engine(speculation, static_batching, max_batch)
        submit = engine.submit
        engine.submit = lambda ids, params: calls.append((speculation, ids)) or submit(ids, params)
        return engine

    runs = interleaved(recording, prompts, 1, 4, ["off", "adaptive"], max_tokens=3, rounds=2)
    assert [r.name for r in runs] == ["c1-off", "c1-adaptive"] and all(r.requests == 4 for r in runs)
    p = prompts
    assert calls == [("off", p[0]), ("off", p[1]), ("adaptive", p[0]), ("adaptive", p[1]),
                     ("adaptive", p[2]), ("adaptive", p[3]), ("off", p[2]), ("off", p[3])]
    assert {r.guard_backoffs for r in runs} == {0}  # a declared cost model: no guard
