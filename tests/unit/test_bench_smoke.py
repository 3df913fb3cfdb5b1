"""The benchmarks whose figures the README quotes run end to end with the smallest settings: each main path on
the embedded SmolLM2 (the smallest real model: the benchmarks need its tokenizer), checking the report's fields.
Their figures are timings: only their presence and the invariants that do not depend on speed are asserted."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_single_reports_every_configuration_and_medusa_equals_plain(monkeypatch, tmp_path, capsys):
    from nbkit.bench import single

    out = tmp_path / "single.json"
    monkeypatch.setattr(sys, "argv", ["single", "--prompts", "2", "--max-tokens", "12", "--trees", "auto,chain-2",
                                      "--out", str(out)])
    single.main()
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    configs = {"hf", "plain", "auto", "chain-2"}
    assert report["prompts"] == 2 and report["max_tokens"] == 12
    assert set(report["tokens_per_s"]) == set(report["ratio_vs_plain"]) == configs
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert set(report["mean_accepted_per_step"]) == configs - {"hf"}
    assert report["mean_accepted_per_step"]["chain-2"] >= 1.0
    assert report["outputs_differing_from_plain"] == {"plain": 0, "auto": 0, "chain-2": 0}  # greedy: lossless
    assert sum(report["adaptive_tree_choices"].values()) > 0


def test_stops_reports_both_measurements(monkeypatch, capsys):
    from nbkit.bench import stops

    monkeypatch.setattr(sys, "argv", ["stops", "--tokens", "6", "--repeats", "1", "--stream-tokens", "60"])
    stops.main()
    text = capsys.readouterr().out
    body, verdict = text[: text.rindex("}") + 1], text[text.rindex("}") + 1:]
    report = json.loads(body)
    assert set(report["end_to_end_ms_per_token"]) == set(report["text_stream_us_per_token"]) == {"none", "four_256"}
    assert all(v > 0 for v in report["end_to_end_ms_per_token"].values())
    assert report["end_to_end_ratio"] == pytest.approx(
        report["end_to_end_ms_per_token"]["four_256"] / report["end_to_end_ms_per_token"]["none"], rel=0.02)
    assert report["text_stream_tokens"] == 60 and report["tokens_per_request"] == 6 and report["repeats"] == 1
    assert "the 10% floor" in verdict


def test_overhead_reports_engine_and_http_medians(capsys):
    from nbkit.bench import overhead

    assert overhead.main(["--max-tokens", "4", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["requests_per_path"] == len(overhead.PROMPTS) and report["max_tokens"] == 4
    assert 0 < report["mean_completion_tokens"] <= 4 and report["speculation"] == "off"
    assert report["engine_median_s"] > 0 and report["http_median_s"] > 0
    assert report["overhead"] == pytest.approx(report["http_median_s"] / report["engine_median_s"] - 1, abs=0.01)
