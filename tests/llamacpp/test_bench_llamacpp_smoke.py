"""The llama.cpp benchmarks' run path (nbkit/bench/llamacpp*.py, figures the README quotes) with the smallest
settings: every peer runs, the report has every field, and outputs that the engines promise equal are equal.
llama-server is left out (--skip-server builds no binary); its figures are then absent, not invented."""

from __future__ import annotations

import json
import math
import sys

import pytest

pytestmark = pytest.mark.slow


def test_llamacpp_bench_runs_every_peer_and_reports_ratios(monkeypatch, tmp_path):
    from nbkit.bench import llamacpp

    out = tmp_path / "llamacpp.json"
    monkeypatch.setattr(sys, "argv", ["llamacpp", "--formats", "Q4_1", "--tokens", "4", "--prompts-c1", "1",
                                      "--prompts-c16", "2", "--concurrency", "2", "--skip-server", "--out", str(out)])
    llamacpp.main()
    report = json.loads(out.read_text())
    assert report["tokens"] == 4 and report["mode"] == "exact" and set(report["formats"]) == {"Q4_1"}
    r = report["formats"]["Q4_1"]
    for peer in ("c1_llama_high_level", "c1_engine_off", "c1_engine_adaptive", "c16_engine_off",
                 "c16_engine_adaptive", "c1_engine_off_heads", "c16_engine_off_heads"):
        assert r[peer]["tokens"] > 0 and r[peer]["tokens_per_s"] > 0, peer
    assert math.isnan(r["c16_llama_server"]["tokens_per_s"])  # skipped, and said so
    assert r["ratios"]["c1_adaptive_vs_off"] == pytest.approx(
        r["c1_engine_adaptive"]["tokens_per_s"] / r["c1_engine_off"]["tokens_per_s"])
    assert r["divergence"]["prompts"] == 1
    assert r["divergence"]["c1_adaptive_vs_c1_off"] == 0  # the exact mode: Medusa's greedy output is plain's


def test_llamacpp_exact_bench_reports_modes_and_matches(monkeypatch, tmp_path):
    from nbkit.bench import llamacpp_exact

    out = tmp_path / "exact.json"
    monkeypatch.setattr(sys, "argv", ["llamacpp_exact", "--tokens", "4", "--prompts-c1", "1", "--prompts-c16", "2",
                                      "--tree-concurrency", "2", "--kinds", "off,adaptive", "--modes", "exact,fast",
                                      "--out", str(out)])
    llamacpp_exact.main()
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"c1", "c16"}  # no tree kind asked: no tree-concurrency block
    for c in ("c1", "c16"):
        assert set(report["results"][c]) == {"exact_off", "exact_adaptive", "fast_off", "fast_adaptive"}
        assert all(v["tokens_per_s"] > 0 for v in report["results"][c].values())
    s = report["summary"]
    assert set(s["over_fast"]) == {"c1_exact_off", "c1_exact_adaptive", "c16_exact_off", "c16_exact_adaptive"}
    assert s["match"]["exact"]["prompts_compared"] == 1
    assert s["match"]["exact"]["c1_adaptive_vs_off"] == 1.0  # exact mode: same greedy output with Medusa
    assert "v_cache_q8_0_vs_f16" in s


def test_default_engine_bench_reports_prefill_and_decoding_side_by_side(monkeypatch, tmp_path):
    from nbkit.bench import default_engine

    out = tmp_path / "default.json"
    monkeypatch.setattr(sys, "argv", ["default_engine", "--prefill-tokens", "20,40", "--prefill-reps", "1", "--tokens",
                                      "4", "--prompts-c1", "1", "--prompts-cn", "2", "--concurrency", "2",
                                      "--skip-server", "--out", str(out)])
    default_engine.main()
    report = json.loads(out.read_text())
    assert set(report["prefill"]) == {"20", "40"}
    pre = report["prefill"]["40"]
    assert {"nbkit_llamacpp_exact", "nbkit_llamacpp_fast", "nbkit_torch_t1", "hf_forward_t1"} <= set(pre)
    assert "llama_server" not in pre and "exact_vs_llama_server" not in pre["ratios"]  # skipped: absent, not invented
    assert pre["ratios"]["torch_vs_hf_t1"] == pytest.approx(
        pre["nbkit_torch_t1"]["tokens_per_s_best"] / pre["hf_forward_t1"]["tokens_per_s_best"])
    c1 = report["c1"]
    assert c1["nbkit_http"]["tokens"] > 0 and c1["llama_cpp_python"]["tokens"] > 0
    assert c1["ratio_nbkit_http_vs_llama_cpp_python"] == pytest.approx(
        c1["nbkit_http"]["tokens_per_s"] / c1["llama_cpp_python"]["tokens_per_s"])
    assert report["c2"]["nbkit_http"]["tokens"] > 0 and "llama_server" not in report["c2"]
