"""Environment detection, the one-screen summary, and the memory plan that picks quantization and engine."""

from __future__ import annotations

import json

import pytest

from nbkit.notebook import env

T4_TORCH_GIB = 15828320256 / 2**30  # what torch reports as a T4's total memory (14.74 GiB)


@pytest.mark.parametrize("gib, engine, quant", [
    (T4_TORCH_GIB, "llamacpp", "q8_0"),  # F16 12.6 + heads 1.5 + KV does not fit a T4
    (22.0, "torch", "f16"),  # L4
    (39.4, "torch", "f16"),  # A100 40GB
    (79.1, "torch", "f16"),  # A100 80GB / H100
    (11.0, "llamacpp", "q4_k_m"),  # 12 GB consumer cards
    (None, "llamacpp", "q4_k_m"),  # CPU
])
def test_plan_from_gpu_memory(gib, engine, quant):
    plan = env.choose_plan(gib)
    assert (plan.engine, plan.quantization) == (engine, quant)
    if gib is not None and "NOT" not in plan.reason:
        assert plan.weights_gib + plan.heads_gib + plan.kv_gib + env.CUDA_OVERHEAD_GIB <= gib


def test_plan_of_a_t4_matches_the_measured_sizes():
    plan = env.choose_plan(T4_TORCH_GIB)
    assert abs(plan.weights_gib - 6.7) < 0.1  # vicuna-7b Q8_0 GGUF
    assert abs(env.choose_plan(80).weights_gib - 12.6) < 0.1  # F16
    assert "does NOT fit" in env.choose_plan(5.0).reason


def test_sizes_from_a_model_config(tmp_path):
    vicuna = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000, "intermediate_size": 11008,
              "num_attention_heads": 32}
    (tmp_path / "config.json").write_text(json.dumps(vicuna))
    sizes = env.sizes_from_config(tmp_path)
    assert abs(sizes["params_b"] - 6.74) < 0.01
    assert sizes["kv_mib_per_token"] == 0.5
    assert abs(sizes["heads_gib"] * 2**30 / 1e9 - 1.47) < 0.01  # 5 heads, own lm_head each, fp16
    assert env.sizes_from_config(tmp_path / "missing") == {}


def test_resolve_plan_keeps_explicit_parameters():
    cpu = env.Environment(colab=False, python="3.11", torch="2", cuda=None)
    assert env.resolve_plan("auto", "auto", env=cpu).engine == "llamacpp"
    plan = env.resolve_plan("torch", "none", env=cpu)
    assert (plan.engine, plan.quantization) == ("torch", "none")
    t4 = env.Environment(colab=True, python="3.12", torch="2", cuda="12.4",
                         gpus=[env.Gpu("Tesla T4", T4_TORCH_GIB, 14.6, (7, 5))])
    assert env.resolve_plan(env=t4).quantization == "q8_0"


def test_summary_fits_one_screen():
    t4 = env.Environment(colab=True, python="3.12.1", torch="2.8.0+cu126", cuda="12.6", cpus=2, ram_gib=12.7,
                         disk_free_gib=70, gpus=[env.Gpu("Tesla T4", T4_TORCH_GIB, 14.6, (7, 5))])
    text = env.summary(t4)
    assert "Google Colab" in text and "Tesla T4" in text and "14.7 GiB" in text
    assert "CMAKE_CUDA_ARCHITECTURES=75" in text
    assert len(text.splitlines()) <= 10 and max(map(len, text.splitlines())) < 140
    here = env.detect()
    assert here.python and here.cpus >= 1 and "runtime" in env.summary(here)


def test_nvidia_smi_parsing():
    out = "Tesla T4, 15360, 15095, 7.5\nNVIDIA A100-SXM4-40GB, 40960, 40327, 8.0\n"
    gpus = env.parse_nvidia_smi(out)
    assert [g.name for g in gpus] == ["Tesla T4", "NVIDIA A100-SXM4-40GB"]
    assert gpus[0].total_gib == 15.0 and gpus[1].arch == "80"


def test_param_reads_the_environment(monkeypatch):
    monkeypatch.setenv("NBKIT_PORT", "8123")
    monkeypatch.setenv("NBKIT_MODEL", "/models/x")
    monkeypatch.setenv("NBKIT_RUN_BENCH", "false")
    monkeypatch.setenv("NBKIT_API_KEY", "none")
    assert env.param("port", 8000) == 8123
    assert env.param("model", "lmsys/vicuna-7b-v1.3") == "/models/x"
    assert env.param("run_bench", True) is False
    assert env.param("api_key", None) is None
    assert env.param("tunnel", "auto") == "auto"


def test_secret_prefers_colab_then_environment(monkeypatch):
    monkeypatch.setenv("NGROK_AUTHTOKEN", "from-env")
    assert env.secret("NGROK_AUTHTOKEN") == ("from-env", "environment variable NGROK_AUTHTOKEN")
    monkeypatch.setattr(env, "colab_secret", lambda name: "from-colab")
    assert env.secret("NGROK_AUTHTOKEN") == ("from-colab", "Colab secret NGROK_AUTHTOKEN")
