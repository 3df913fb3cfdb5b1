"""Plans that cannot fit are refused before any download; the torch engine's label says what it loads; a
machine without a GPU serves the embedded model instead of downloading a 7B one (unless told otherwise)."""

from __future__ import annotations

import json

import pytest

from nbkit.notebook import env, fit, hub

T4 = env.Environment(colab=True, python="3.13", torch="2.11", cuda="12.8",
                     gpus=[env.Gpu("Tesla T4", 15828320256 / 2**30, 14.6, (7, 5))])
A100 = env.Environment(colab=True, python="3.13", torch="2.11", cuda="12.8",
                       gpus=[env.Gpu("NVIDIA A100-SXM4-40GB", 39.4, 39.0, (8, 0))])
CPU = env.Environment(colab=False, python="3.11", torch="2.13", cuda=None)
VICUNA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
          "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000, "model_type": "llama"}
SMALL = {**VICUNA, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_hidden_layers": 16}


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """vicuna-7b's real config.json (and 13.5 GB of 'weights' that must never be fetched), a 0.3B model."""
    root = tmp_path / "mirror"
    for repo, cfg in (("lmsys/vicuna-7b-v1.3", VICUNA), ("acme/small", SMALL)):
        (root / repo).mkdir(parents=True)
        (root / repo / "config.json").write_text(json.dumps(cfg))
        (root / repo / "pytorch_model-00001-of-00002.bin").write_bytes(b"w" * 1000)
        (root / repo / "tokenizer.model").write_bytes(b"t")
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(root))
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    return root


def fetched(repo: str) -> list[str]:
    return sorted(p.name for p in hub.local_dir_for(repo).iterdir())


def test_torch_f16_on_a_t4_is_refused_before_anything_is_downloaded(mirror):
    with pytest.raises(env.PlanError) as err:
        fit.plan_for("torch", "auto", T4, "lmsys/vicuna-7b-v1.3")
    why = str(err.value)
    assert "torch/f16 does not fit Tesla T4" in why and "12.6 GiB weights" in why and "> 14.7 GiB" in why
    assert "Nothing was downloaded" in why and "ENGINE='auto'" in why
    assert fetched("lmsys/vicuna-7b-v1.3") == ["config.json"]  # only the kilobytes needed to plan


def test_torch_plan_is_labelled_with_what_it_loads(mirror):
    plan = fit.plan_for("torch", "auto", A100, "lmsys/vicuna-7b-v1.3")
    assert (plan.engine, plan.quantization) == ("torch", "f16")  # not the llama.cpp plan's q8_0
    assert abs(plan.weights_gib - 12.6) < 0.1 and plan.fits()
    small = fit.plan_for("torch", "auto", T4, "acme/small")  # a small model fits a T4 in f16
    assert (small.engine, small.quantization) == ("torch", "f16") and small.weights_gib < 1.5
    with pytest.raises(env.PlanError, match="ENGINE='llamacpp'"):
        fit.plan_for("torch", "q8_0", A100, "lmsys/vicuna-7b-v1.3")


def test_other_plans_that_cannot_fit_are_refused(mirror):
    with pytest.raises(env.PlanError, match="llamacpp/f16 does not fit Tesla T4"):
        fit.plan_for("llamacpp", "f16", T4, "lmsys/vicuna-7b-v1.3")
    tiny_gpu = env.Environment(colab=True, python="3.13", torch="2", cuda="12", gpus=[env.Gpu("GT", 4.0, 4.0, (6, 1))])
    with pytest.raises(env.PlanError, match="does not fit GT"):
        fit.plan_for(env=tiny_gpu, model="lmsys/vicuna-7b-v1.3")
    auto = fit.plan_for(env=T4, model="lmsys/vicuna-7b-v1.3")  # the default on a T4 still runs
    assert (auto.engine, auto.quantization) == ("llamacpp", "q8_0") and auto.fits()
    assert fit.plan_for(env=T4, model="embedded").fits()


def test_an_unreadable_config_plans_with_vicunas_sizes(mirror, capsys):
    assert fit.model_sizes("acme/does-not-exist") == {}
    assert "planning with vicuna-7b's sizes" in capsys.readouterr().out
    assert fit.model_sizes(None) == {} and fit.model_sizes("x.gguf") == {}


def test_no_gpu_serves_the_embedded_model_with_a_note(mirror, capsys):
    assert fit.fit_model("lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3", CPU) == ("embedded",
                                                                                                   "embedded")
    note = capsys.readouterr().out
    assert "No GPU here" in note and "lmsys/vicuna-7b-v1.3" in note and "ALLOW_CPU = True" in note
    assert "6.7 B parameters: a 13.5 GB download" in note
    assert fetched("lmsys/vicuna-7b-v1.3") == ["config.json"]


def test_the_fallback_keeps_what_was_asked_for_when_it_can(mirror, tmp_path):
    vicuna = ("lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3")
    assert fit.fit_model(*vicuna, CPU, allow_cpu=True) == vicuna  # explicit: run it on the CPU anyway
    assert fit.fit_model(*vicuna, T4) == vicuna  # a GPU: nothing changes
    assert fit.fit_model("acme/small", "none", CPU) == ("acme/small", "none")  # small enough for a CPU
    assert fit.fit_model("embedded", "", CPU) == ("embedded", "")
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(VICUNA))
    assert fit.fit_model(str(folder), "none", CPU) == ("embedded", "embedded")


def test_allow_cpu_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NBKIT_ALLOW_CPU", "1")
    assert env.param("allow_cpu", False) is True
