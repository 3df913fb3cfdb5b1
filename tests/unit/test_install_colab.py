"""The installer's decisions on Colab's real package list (tests/unit/data/colab_pip_freeze_gpu.txt, with its
source and date): install what nbkit cannot do without, keep every package Colab ships that nbkit works with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbkit.notebook import install

FREEZE = Path(__file__).parent / "data" / "colab_pip_freeze_gpu.txt"


def colab_versions() -> dict[str, str]:
    pins = [line.split("==") for line in FREEZE.read_text().splitlines() if "==" in line and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


@pytest.fixture
def colab(monkeypatch):
    versions = colab_versions()
    monkeypatch.setattr(install, "installed_version", lambda name: versions.get(re.sub(r"[-_.]+", "-", name).lower()))
    return versions


def test_the_fixture_is_colabs_gpu_image():
    versions = colab_versions()
    assert versions["torch"].endswith("+cu128") and versions["ipywidgets"] == "7.7.1"
    assert "github.com/googlecolab/backend-info" in FREEZE.read_text()


def test_decisions_on_colab(colab):
    decisions = {d.name.lower().replace("_", "-"): d for d in install.decide(install.read_pins())}
    to_install = {name for name, d in decisions.items() if d.install}
    # transformers 5.15 / tokenizers 0.22 / hub 1.27 are older than the exact versions nbkit follows;
    # gguf, sse-starlette, pyngrok, diskcache and xgrammar are not in Colab at all.
    assert to_install == {"transformers", "tokenizers", "huggingface-hub", "gguf", "sse-starlette", "pyngrok",
                          "diskcache", "xgrammar"}
    assert decisions["ipywidgets"].why.startswith("kept") and decisions["ipywidgets"].have == "7.7.1"
    for name in ("numpy", "matplotlib", "fastapi", "uvicorn", "pydantic", "accelerate", "tqdm", "sentencepiece",
                 "httpx", "prometheus-client", "jinja2", "safetensors"):
        assert not decisions[name].install, decisions[name]
    assert decisions["transformers"].why == "exact version needed"


def test_torch_and_protobuf_stay(colab):
    torch, protobuf = install.decide([("torch", "2.13.0"), ("protobuf", "7.36.2")])
    assert not torch.install and "never" in torch.why
    assert not protobuf.install and protobuf.have == "5.29.6"  # TensorFlow in Colab depends on its own protobuf
    ipywidgets_6 = install._decide("ipywidgets", "8.1.9", "6.0.0")
    assert ipywidgets_6.install  # too old for the chat panel: then it is upgraded


def test_installing_never_replaces_a_kept_package(colab, monkeypatch, capsys):
    commands, constraints = [], []

    def run(cmd, check):
        commands.append(cmd)
        files = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-c"]
        constraints.append([line for f in files for line in Path(f).read_text().splitlines()])

    monkeypatch.setattr(install.subprocess, "run", run)
    monkeypatch.setattr(install, "loaded", lambda reqs: [])
    done = install.ensure_requirements(install=True)
    assert not any(r.startswith(("ipywidgets", "torch", "fastapi", "numpy")) for r in done)
    first = constraints[0]
    assert "torch==2.11.0+cu128" in first and "ipywidgets==7.7.1" in first and "fastapi==0.141.1" in first
    assert "numpy==2.1.3" in first and not any(c.startswith("transformers") for c in first)
    assert "ipywidgets 7.7.1 (pinned 8.1.9)" in capsys.readouterr().out
