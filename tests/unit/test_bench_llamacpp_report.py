"""The llama.cpp benchmarks' JSON: every figure and match rate, not the answers' token ids."""

from __future__ import annotations

import json

from nbkit.bench.llamacpp import write_report
from nbkit.bench.llamacpp_exact import summary


def _result(outputs: list[list[int]], tokens_per_s: float) -> dict:
    return {"tokens": 6, "seconds": 6 / tokens_per_s, "outputs": outputs, "wave_tokens_per_s": [tokens_per_s],
            "tokens_per_s": tokens_per_s, "tree_choices": {"none": 3}}


def test_the_report_keeps_figures_tree_choices_and_match_rates_not_outputs(tmp_path):
    solo = [[1, 2, 3], [4, 5, 6]]
    res = {1: {"exact_off": _result(solo, 10.0), "exact_adaptive": _result(solo, 11.0),
               "fast_off": _result(solo, 12.5), "fast_adaptive": _result([[1, 2, 3], [4, 5, 7]], 12.0)},
           16: {"exact_off": _result(solo, 20.0), "fast_off": _result([[1, 2, 9], [4, 5, 7]], 25.0)}}
    report = {"command": "python -m nbkit.bench.llamacpp_exact", "tokens": 3,
              "results": {f"c{c}": r for c, r in res.items()}, "summary": summary(res, ["exact", "fast"])}
    write_report(report, tmp_path / "out" / "report.json")
    text = (tmp_path / "out" / "report.json").read_text()
    written = json.loads(text)
    assert "outputs" not in text
    assert written["command"] == report["command"] and written["tokens"] == 3
    assert written["results"]["c1"]["exact_adaptive"] == {"tokens": 6, "seconds": 6 / 11.0, "wave_tokens_per_s": [11.0],
                                                         "tokens_per_s": 11.0, "tree_choices": {"none": 3}}
    match = written["summary"]["match"]
    assert match["exact"] == {"c1_adaptive_vs_off": 1.0, "c16_off_vs_c1_off": 1.0, "prompts_compared": 2}
    assert match["fast"] == {"c1_adaptive_vs_off": 0.5, "c16_off_vs_c1_off": 0.0, "prompts_compared": 2}
    assert written["summary"]["over_fast"] == {"c1_exact_off": 0.8, "c1_exact_adaptive": 11.0 / 12.0, "c16_exact_off": 0.8}
    assert report["results"]["c1"]["exact_off"]["outputs"] == solo  # only the file goes without them
