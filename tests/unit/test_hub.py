"""Hub helpers against a local mirror folder (no network): only the needed files, re-runs reuse them,
heads counted from the weights; and the token is never shown."""

from __future__ import annotations

import json

import pytest
import torch

from nbkit.medusa.heads import MedusaHeads
from nbkit.notebook import hub


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(root))
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    # A repo with both weight formats and files we must not fetch.
    repo = root / "acme" / "tiny-llama"
    repo.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "README.md", "flax_model.msgpack", "pytorch_model.bin"):
        (repo / name).write_text("{}" if name.endswith(".json") else "x" * 100)
    (repo / "config.json").write_text(json.dumps({"hidden_size": 16, "vocab_size": 32}))
    (repo / "model.safetensors").write_bytes(b"s" * 1000)
    # vicuna-7b-v1.3 style: .bin shards only.
    bins = root / "acme" / "bin-only"
    bins.mkdir(parents=True)
    for name in ("config.json", "tokenizer.model", "pytorch_model-00001-of-00002.bin",
                 "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", ".gitattributes"):
        (bins / name).write_text("b")
    # FasterDecoding style heads: medusa_lm_head.pt with 5 heads, config.json claiming 2.
    heads_repo = root / "acme" / "medusa-tiny"
    heads_repo.mkdir(parents=True)
    torch.manual_seed(0)
    heads = MedusaHeads(16, 5, 1, vocab_size=32)
    torch.save(heads.heads.state_dict(), heads_repo / "medusa_lm_head.pt")
    (heads_repo / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    (heads_repo / "README.md").write_text("readme")
    return root


def test_model_download_fetches_only_what_is_needed(mirror):
    out = hub.download_model("acme/tiny-llama")
    assert out == hub.local_dir_for("acme/tiny-llama")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    out = hub.download_model("acme/bin-only")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "tokenizer.model"]


def test_rerun_reuses_and_resumes(mirror):
    out = hub.download_model("acme/tiny-llama")
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    (out / "tokenizer.json").write_text("{")  # an interrupted copy: wrong size
    hub.download_model("acme/tiny-llama")
    assert weights.stat().st_mtime_ns == before  # complete files are not fetched again
    assert (out / "tokenizer.json").read_text() == "{}"
    assert not list(out.glob("*.incomplete"))


def test_local_folders_pass_through(tmp_path):
    assert hub.download_model(str(tmp_path)) == tmp_path
    assert hub.download_heads(str(tmp_path)) == tmp_path


def test_one_resolver_for_every_heads_argument(mirror, tmp_path):
    """nbkit.hub.resolve_heads: what load_engine, the vLLM export and --heads all go through."""
    from nbkit.hub import resolve_heads
    from nbkit.models import embedded_heads_dir

    shipped = embedded_heads_dir()
    assert resolve_heads(None, None) == shipped and resolve_heads("", "embedded") == shipped  # embedded model
    assert resolve_heads(None, str(tmp_path)) is None  # another model: no heads unless named
    assert resolve_heads("none", None) is None and resolve_heads("none", str(tmp_path)) is None
    assert resolve_heads("embedded", str(tmp_path)) == shipped == resolve_heads("default")
    assert resolve_heads(str(tmp_path)) == tmp_path and resolve_heads(tmp_path) == tmp_path
    fetched = resolve_heads("acme/medusa-tiny", str(tmp_path))  # a hub id: fetched into the cache
    assert fetched == hub.local_dir_for("acme/medusa-tiny") and (fetched / "medusa_lm_head.pt").is_file()


def test_heads_counted_from_the_weights(mirror):
    path = hub.download_heads("acme/medusa-tiny")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "medusa_lm_head.pt"]
    info = hub.inspect_heads(path, hub.download_model("acme/tiny-llama"))
    assert (info.n_heads, info.n_layers, info.own_lm_head, info.config_heads) == (5, 1, True, 2)
    assert "5 heads (config.json says 2; the weights win)" in repr(info)
    assert hub.inspect_heads(path).n_heads == 5  # hidden size read from the weights
    with pytest.raises(FileNotFoundError, match="medusa_lm_head"):
        hub.download_heads("acme/tiny-llama")


def test_without_a_mirror_the_hub_is_asked_for_exact_files(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("NBKIT_HUB_MIRROR", raising=False)
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path))
    calls = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json", "README.md"])

    def snapshot(repo, **kw):
        calls.update(kw, repo=repo)
        return str(kw["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    out = hub.download_model("lmsys/some-model")
    assert calls["repo"] == "lmsys/some-model" and out == tmp_path / "hub" / "lmsys--some-model"
    assert sorted(calls["allow_patterns"]) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]


def test_login_never_shows_the_token(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    status = hub.login(interactive=False)
    assert not status.logged_in and "HF_TOKEN" in repr(status)
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    status = hub.login()
    print(status)
    assert status.logged_in and status.source == "environment variable HF_TOKEN"
    assert "hf_supersecret123" not in repr(status) + str(vars(status)) + capsys.readouterr().out


def test_prepare_for_each_engine(mirror, monkeypatch):
    from nbkit.gguf import convert
    from nbkit.notebook.env import choose_plan

    torch_plan, llamacpp_plan = choose_plan(40.0), choose_plan(15.0)
    p = hub.prepare("acme/tiny-llama", "acme/medusa-tiny", torch_plan)
    assert p.engine == "torch" and p.model == str(hub.local_dir_for("acme/tiny-llama"))
    assert p.heads == str(hub.local_dir_for("acme/medusa-tiny")) and p.heads_info.n_heads == 5
    assert "5 heads" in repr(p)
    calls = []
    monkeypatch.setattr(convert, "convert", lambda src, outtype="f16", quantize_to=None: calls.append(
        (str(src), outtype, quantize_to)) or f"/gguf/{outtype}-{quantize_to}.gguf")
    p = hub.prepare("acme/tiny-llama", "none", llamacpp_plan)  # a T4: Q8_0 written by the converter directly
    assert (p.engine, p.model, p.heads) == ("llamacpp", "/gguf/q8_0-None.gguf", "none")
    hub.prepare("acme/tiny-llama", None, choose_plan(11.0))  # Q4_K_M: F16 first, then quantized
    assert calls[-1] == (str(hub.local_dir_for("acme/tiny-llama")), "f16", "Q4_K_M")
    p = hub.prepare("embedded", None, llamacpp_plan)
    assert (p.model, p.heads) == (None, None)  # the engines know the embedded model and its heads
