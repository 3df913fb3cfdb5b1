"""The engine that serves when none is named (nbkit/engine/choice.py), and the start-up cache's file handling
(nbkit/engine/startcache.py: a stale or corrupt file is ignored with a log line)."""

import json
import logging

import pytest

from nbkit.engine import choice
from nbkit.engine.choice import choose_engine
from nbkit.engine.speculation import CostModel
from nbkit.engine.startcache import StartupCache
from nbkit.server.cli import register_cli


@pytest.fixture
def bindings(monkeypatch):
    """Whether the llama.cpp bindings are installed, as the rule sees it (set by the test)."""
    installed = {"llama_cpp": True}
    real = choice.importlib.util.find_spec
    monkeypatch.setattr(choice.importlib.util, "find_spec",
                        lambda name: (object() if installed[name] else None) if name == "llama_cpp" else real(name))
    return installed


def test_a_cpu_with_a_gguf_gets_llamacpp(bindings, tmp_path):
    for model in (None, "embedded", str(tmp_path / "model.Q8_0.gguf")):
        picked = choose_engine(None, model, "cpu")
        assert picked.name == "llamacpp" and "GGUF" in picked.reason
    assert choose_engine("auto", None, "cpu").name == "llamacpp"


def test_torch_on_a_gpu_for_a_transformers_folder_and_without_bindings(bindings, tmp_path):
    assert choose_engine(None, None, "cuda").name == "torch"
    assert "GPU" in choose_engine(None, str(tmp_path / "m.gguf"), "cuda:0").reason
    folder = choose_engine(None, str(tmp_path), "cpu")
    assert folder.name == "torch" and "transformers" in folder.reason
    assert choose_engine(None, "lmsys/vicuna-7b-v1.3", "cpu").name == "torch"
    bindings["llama_cpp"] = False
    missing = choose_engine(None, None, "cpu")
    assert missing.name == "torch" and "not installed" in missing.reason


def test_a_named_engine_is_served_as_named(bindings):
    assert choose_engine("torch", None, "cpu").name == "torch"
    named = choose_engine("llamacpp", "folder", "cuda")
    assert named.name == "llamacpp" and "--engine" in named.reason


def test_serve_defaults_to_auto():
    import argparse

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    assert parser.parse_args(["serve"]).engine == "auto"
    assert parser.parse_args(["serve", "--engine", "torch"]).engine == "torch"
    # A first start is healthy at once and measures its forward costs while serving, unless asked otherwise.
    assert parser.parse_args(["serve"]).calibrate == "while-serving"
    assert parser.parse_args(["serve", "--calibrate", "at-start"]).calibrate == "at-start"


KEY = {"format": 1, "machine": "cpu x", "engine": "torch", "model_path": "/m", "heads_path": None,
       "settings": {"max_batch": 2}, "model_files": [["config.json", 1, 2]], "heads_files": None,
       "versions": {"nbkit": "0", "code": "abc"}}


def _costs() -> CostModel:
    model = CostModel({1: 0.01, 2: 0.015, 4: 0.02}, {1: 0.001, 2: 0.0015})
    model.measured.update({(1, 1): 0.01, (2, 3): 0.03})
    return model


def test_the_cache_gives_back_what_it_kept(tmp_path):
    StartupCache(KEY, tmp_path).save_costs(_costs())
    again = StartupCache(KEY, tmp_path).costs()
    assert again.points == _costs().points and again.heads_points == _costs().heads_points
    assert again.measured == _costs().measured and again.reference == (again.points, again.measured)
    assert StartupCache(KEY, tmp_path).self_check() is None  # not kept: checked at the next start


def test_a_stale_or_corrupt_file_is_ignored_with_a_log_line(tmp_path, caplog):
    cache = StartupCache(KEY, tmp_path)
    cache.save_costs(_costs())
    newer = {**KEY, "versions": {"nbkit": "0", "code": "def"}, "model_files": [["config.json", 1, 3]]}
    with caplog.at_level(logging.INFO, logger="nbkit.engine"):
        stale = StartupCache(newer, tmp_path)
    assert stale.path == cache.path and stale.costs() is None
    assert "stale (model_files, versions changed)" in caplog.text
    stale.save_costs(_costs())  # rewritten under the new key
    assert StartupCache(newer, tmp_path).costs() is not None and StartupCache(KEY, tmp_path).costs() is None

    caplog.clear()
    cache.path.write_text('{"key": ')
    with caplog.at_level(logging.INFO, logger="nbkit.engine"):
        assert StartupCache(newer, tmp_path).costs() is None
    assert "is corrupt" in caplog.text

    caplog.clear()
    record = {"key": newer, "costs": {"points": {"1": -1.0}, "heads": {}, "measured": []}}
    cache.path.write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="nbkit.engine"):
        assert StartupCache(newer, tmp_path).costs() is None
    assert "calibration is corrupt" in caplog.text
