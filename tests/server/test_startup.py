"""Start-up: with no engine named, a GGUF on a CPU is served by llama.cpp, which /info says with the reason;
a second start with the same machine, files and settings reuses the first start's calibration and self-check
verdict (startcache.py) and does neither again; a first start that calibrates while serving is ready at once and
caches what it measured in idle time. Checked on counters, never on clocks, on the vicuna miniature
(Llama, sentencepiece, BOS) through the hub mirror, on both engines."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import httpx
import pytest
from vicuna_mini import BASE_ID, HEADS_ID

from nbkit.engine import selfcheck, startcache
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import component
from nbkit.engine.warmup import warming_up
from nbkit.notebook import hub
from nbkit.server.launch import start_server

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

pytestmark = [pytest.mark.slow, pytest.mark.tiny]  # the miniature: one torch thread


def _prepared(kind: str, mirror):
    if kind == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")
    return hub.prepare(BASE_ID, HEADS_ID, SimpleNamespace(engine=kind, quantization="q8_0"), mirror=mirror)


def _cache_in(tmp_path, monkeypatch) -> None:
    """The start-up cache on (the suite turns it off), in a tmp dir: no state shared with other tests."""
    monkeypatch.setenv("NBKIT_STARTUP_CACHE", "on")
    monkeypatch.setattr(startcache, "cache_root", lambda: tmp_path)


def _no_work(*args, **kwargs):
    raise AssertionError("a start with a cached calibration and verdict measured again")


@pytest.mark.parametrize("kind", ["torch", "llamacpp"])
def test_a_second_start_reuses_the_calibration_and_the_verdict(kind, vicuna_mirror, tmp_path, monkeypatch):
    prepared = _prepared(kind, vicuna_mirror)
    _cache_in(tmp_path, monkeypatch)

    first = load_engine(kind, prepared.model, heads=prepared.heads, max_batch=2).prepare()
    assert first.speculation.calibrations == 1 and first.limits().calibration == "measured"
    assert first.self_check.passed and not first.self_check.cached
    assert [p.name for p in tmp_path.iterdir()] == [first.startup_cache.path.name]

    monkeypatch.setattr(component, "Calibration", _no_work)
    monkeypatch.setattr(selfcheck, "check_runner", _no_work)
    second = load_engine(kind, prepared.model, heads=prepared.heads, max_batch=2).prepare()
    assert second.speculation.calibrations == 0 and second.limits().calibration == "cached"
    assert second.self_check.cached and second.limits().self_check["cached"]
    assert second.self_check.runs == first.self_check.runs and second.speculation.mode == "adaptive"
    cost, again = first.speculation.cost_model, second.speculation.cost_model
    assert again.points == cost.points and again.measured == cost.measured and again.heads_points == cost.heads_points

    # Other settings are another key: a batch of 3 is calibrated and checked for itself.
    monkeypatch.undo()
    _cache_in(tmp_path, monkeypatch)
    other = load_engine(kind, prepared.model, heads=prepared.heads, max_batch=3).prepare()
    assert other.speculation.calibrations == 1 and not other.self_check.cached
    assert len(list(tmp_path.iterdir())) == 2
    # ... and the cached start serves what the measured one serves (greedy: lossless either way).
    ids = first.encode("Once upon a time a brown")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert second.generate(ids, params).token_ids == first.generate(ids, params).token_ids


@pytest.mark.parametrize("kind", ["torch", "llamacpp"])
def test_a_first_start_serves_at_once_and_caches_what_it_measured_while_serving(kind, vicuna_mirror, tmp_path,
                                                                               monkeypatch):
    prepared = _prepared(kind, vicuna_mirror)
    _cache_in(tmp_path, monkeypatch)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = load_engine(kind, prepared.model, heads=prepared.heads, max_batch=2, calibrate="while-serving").start()
    try:
        # Ready before its forward costs are known and with only plain decoding checked: the tree comes in idle time.
        assert first.limits().calibration == "measuring" and first.limits().self_check["pending"]
        assert set(first.limits().self_check["runs"]) == {"plain_batched"}
        ids = first.encode("Once upon a time a brown")
        during = first.submit(ids, params).result(timeout=300)
        deadline = time.monotonic() + 300
        while warming_up(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.limits().calibration == "measured" and first.speculation.calibrations == 1
        check = first.limits().self_check
        assert check["passed"] and not check["pending"] and {"tree_alone", "tree_batched"} <= set(check["runs"])
        record = startcache.StartupCache(first.startup_cache.key, tmp_path).record  # kept for the next start
        assert "costs" in record and "tree_alone" in record["self_check"]["runs"]
        assert first.generate(ids, params).token_ids == during.token_ids  # lossless before and after pricing
    finally:
        first.stop()

    monkeypatch.setattr(component, "Calibration", _no_work)
    monkeypatch.setattr(selfcheck, "check_runner", _no_work)
    second = load_engine(kind, prepared.model, heads=prepared.heads, max_batch=2, calibrate="while-serving").start()
    try:
        assert second.limits().calibration == "cached" and not second.speculation.measuring
        assert second.self_check.cached and not second.self_check.pending and second.pending_check is None
        assert second.generate(ids, params).token_ids == during.token_ids
    finally:
        second.stop()


def test_serve_with_no_engine_named_picks_llamacpp_for_a_gguf_on_a_cpu(vicuna_mirror, tmp_path, monkeypatch):
    prepared = _prepared("llamacpp", vicuna_mirror)
    _cache_in(tmp_path, monkeypatch)
    handle = start_server(engine="auto", model=prepared.model, heads=prepared.heads, device="cpu", port=0,
                          max_batch=2)
    try:
        info = httpx.get(f"{handle.url}/info", timeout=30).json()
    finally:
        handle.stop()
    assert info["engine"] == "llamacpp" and "GGUF" in info["engine_reason"] and info["mode"] == "exact"
    assert info["calibration"] == "measured" and info["self_check"]["passed"] and not info["self_check"]["cached"]
