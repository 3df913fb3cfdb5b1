"""Colab fixes that need no kernel: the simulated GPU probe, a login that never blocks, Colab's proxy with a
timeout, the API key from a Colab secret, and the benchmark child that finds nbkit on the kernel's path."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from nbkit import hub as hub_calls  # login and the hub calls (the notebooks import them through nbkit.notebook.hub)
from nbkit.notebook import env, install, tunnel, widgets


# --- $NBKIT_GPU ---------------------------------------------------------------------------------------
def test_simulated_gpu_makes_the_plan_and_says_so(monkeypatch):
    monkeypatch.setenv("NBKIT_GPU", "Tesla T4, 15360, 15095, 7.5")
    facts = env.detect()
    assert [g.name for g in facts.gpus] == ["Tesla T4"] and facts.gpu.simulated and facts.gpu.arch == "75"
    assert env.resolve_plan(env=facts).engine == "llamacpp"
    assert "simulated by $NBKIT_GPU" in env.summary(facts)
    monkeypatch.setenv("NBKIT_GPU", "NVIDIA A100-SXM4-40GB, 40960, 40000, 8.0")
    assert (env.resolve_plan().engine, env.resolve_plan().quantization) == ("torch", "f16")
    monkeypatch.setenv("NBKIT_GPU", "a T4 please")
    with pytest.raises(ValueError, match="NBKIT_GPU"):
        env.detect()


def test_simulated_gpu_builds_the_cpu_bindings(monkeypatch):
    from nbkit.gguf import build
    from nbkit.notebook import build_job

    started = []
    monkeypatch.setattr(build, "installed_bindings", lambda: (build.BINDINGS, False))  # the CPU build is installed
    monkeypatch.setattr(build, "source_dir", lambda: None)
    monkeypatch.setattr(build_job, "start_build", lambda cuda, arch, cache, command: started.append((cuda, arch)))
    simulated = env.Environment(colab=True, python="3.12", torch=None, cuda=None,
                                gpus=env.simulated_gpus("Tesla T4, 15360, 15095, 7.5"))
    job = install.ensure_engine(env.choose_plan(15.0), simulated)
    assert started == [] and "already installed" in repr(job)  # planned for the T4, the CPU bindings serve it
    real = env.Environment(colab=True, python="3.12", torch=None, cuda="12.4", gpus=[env.Gpu("Tesla T4", 15, 15, (7, 5))])
    install.ensure_engine(env.choose_plan(15.0), real)
    assert started == [(True, "75")]


# --- login ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_calls, "in_colab", lambda: True)
    monkeypatch.setattr(hub_calls, "colab_secret", lambda name: None)
    asked = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda **kw: asked.append(kw))
    return asked


def test_login_without_a_token_goes_on(no_token):
    status = hub_calls.login()
    assert not status.logged_in and "going on" in repr(status)
    assert no_token == [], "login() must not ask (notebook_login can block Run all for 15 minutes)"


def test_login_hands_the_colab_secret_to_huggingface_hub(no_token, monkeypatch, capsys):
    monkeypatch.setattr(hub_calls, "colab_secret", lambda name: "hf_colabsecret_123" if name == "HF_TOKEN" else None)
    status = hub_calls.login()
    print(status)
    assert status.logged_in and status.source == "Colab secret HF_TOKEN"
    from huggingface_hub import get_token

    assert get_token() == "hf_colabsecret_123" and "hf_colabsecret_123" not in capsys.readouterr().out


def _refusal(kind: str, status: int):
    import httpx
    from huggingface_hub import errors

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    return getattr(errors, kind)(f"{kind} for x", response=response)


@pytest.mark.parametrize("kind,status", [("GatedRepoError", 403), ("RepositoryNotFoundError", 401)])
def test_a_refused_download_asks_once_then_retries(no_token, kind, status, capsys):
    hub_calls.login()
    calls = []

    def listing():
        calls.append(1)
        if len(calls) == 1:
            raise _refusal(kind, status)
        return ["config.json"]

    assert hub_calls._as_user("meta-llama/x", listing) == ["config.json"]
    assert len(calls) == 2 and len(no_token) == 1
    said = capsys.readouterr().out
    assert "meta-llama/x" in said and ("gated" in said if kind == "GatedRepoError" else "401" in said)


def test_a_refused_download_outside_colab_is_a_clear_error(no_token, monkeypatch):
    monkeypatch.setattr(hub_calls, "in_colab", lambda: False)
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        hub_calls._as_user("meta-llama/x", lambda: (_ for _ in ()).throw(_refusal("GatedRepoError", 403)))
    with pytest.raises(FileNotFoundError):  # anything but 401/gated is not a login problem
        hub_calls._as_user("meta-llama/x", lambda: (_ for _ in ()).throw(FileNotFoundError("x")))
    assert no_token == []


# --- Colab's proxy and the API key -----------------------------------------------------------------
@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("NGROK_AUTHTOKEN", "NBKIT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    google, colab = types.ModuleType("google"), types.ModuleType("google.colab")
    output, userdata = types.ModuleType("google.colab.output"), types.ModuleType("google.colab.userdata")
    google.colab, colab.output, colab.userdata = colab, output, userdata
    secrets: dict[str, str] = {}
    userdata.get = lambda name: secrets[name]
    for name, module in {"google": google, "google.colab": colab, "google.colab.output": output,
                         "google.colab.userdata": userdata}.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield output, secrets
    if tunnel.current_tunnel() is not None:
        tunnel.current_tunnel().close()


def test_colab_proxy_has_a_timeout(fake_colab):
    output, _ = fake_colab
    seen = {}

    def eval_js(js, ignore_result=False, timeout_sec=None):
        seen["timeout_sec"] = timeout_sec
        raise TimeoutError("no browser")

    output.eval_js = eval_js
    with pytest.raises(tunnel.TunnelError, match="did not answer within 30 s"):
        tunnel.open_tunnel(8000, provider="colab")
    assert seen == {"timeout_sec": tunnel.EVAL_JS_TIMEOUT_S}


def test_api_key_from_a_colab_secret(fake_colab):
    _, secrets = fake_colab
    assert tunnel.api_key_for("colab") is None
    secrets["NBKIT_API_KEY"] = "nbk-from-the-secret"
    assert tunnel.api_key_for("colab") == "nbk-from-the-secret" == tunnel.api_key_for("ngrok", None, "tok")
    assert tunnel.api_key_for("colab", "given") == "given"


# --- 06_benchmark's child ---------------------------------------------------------------------------
def test_benchmark_child_finds_nbkit_from_the_kernels_path(monkeypatch, tmp_path):
    """As in Colab: nbkit is on this process's sys.path only. The fake Colab's sitecustomize hides the venv's
    editable install from children, so a plain child cannot import nbkit and one with child_env() can."""
    from pathlib import Path

    import nbkit

    hide = Path(__file__).resolve().parents[1] / "notebook" / "fake_colab"
    monkeypatch.setenv("PYTHONPATH", str(hide))
    probe = [sys.executable, "-c", "import nbkit; print(nbkit.__file__)"]
    plain = subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode != 0 and "No module named 'nbkit'" in plain.stderr
    child = subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path, env=widgets.child_env())
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == str(Path(nbkit.__file__).resolve())
