"""Export to vLLM's Medusa format and read it back (tiny random heads, seconds).

Key names, shapes and dtypes are checked against vLLM 0.32.0's Medusa (nbkit.medusa.vllm.VLLM_VERSION):
`vllm/model_executor/models/medusa.py` builds blocks.{h}.layers.{l}.weight [H, H] (+ .bias when
medusa_fc_bias), lm_heads.{h}.weight [V, H], or a single lm_head.weight [truncated, H] that load_weights
fills from lm_heads.0.weight when original_lm_head; token_map holds int64 ids.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nbkit.cli import main
from nbkit.medusa.heads import PROPOSAL_FILE, HeadsFormatError, MedusaHeads, load_heads, save_heads
from nbkit.medusa.vllm import VLLM_VERSION, BaseLMHead, export_vllm, load_vllm_heads

H, V, K = 16, 64, 10
ROOT = Path(__file__).resolve().parents[2]


def _random(heads: MedusaHeads, seed: int) -> MedusaHeads:
    gen = torch.Generator().manual_seed(seed)
    for p in heads.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.5
    return heads


@pytest.fixture()
def faster_decoding(tmp_path) -> Path:
    """FasterDecoding's layout: medusa_lm_head.pt in bf16 holding 5 heads, a config claiming 2."""
    heads = _random(MedusaHeads(H, 5, 1, vocab_size=V), 1)
    folder = tmp_path / "fd"
    folder.mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in heads.heads.state_dict().items()}, folder / "medusa_lm_head.pt")
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    return folder


@pytest.fixture()
def shared(tmp_path) -> tuple[Path, torch.Tensor, list[int]]:
    """nbkit's own layout: shared lm_head, 2 ResBlocks per head, a proposal vocabulary."""
    heads = _random(MedusaHeads(H, 3, 2), 2)
    vocab = list(range(3, V, 2))  # 31 ids
    folder = save_heads(heads, tmp_path / "own", proposal_vocab=vocab, dtype=torch.bfloat16)
    lm_head = torch.randn(V, H, generator=torch.Generator().manual_seed(3))
    return folder, lm_head, vocab


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    lm = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lm.weight.data = weight.float()
    return lm


def _hidden(n: int = 64) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(4)) * 2


def test_faster_decoding_round_trip(faster_decoding, tmp_path):
    out = export_vllm(faster_decoding, tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    assert config["num_heads"] == 5 and config["num_hidden_layers"] == 1  # from the weights, not the config
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is False
    assert config["vocab_size"] == V and config["truncated_vocab_size"] is None
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    tensors = load_file(str(out / "model.safetensors"))
    expected = {f"blocks.{h}.layers.0.{p}": (H, H) if p == "weight" else (H,) for h in range(5) for p in ("weight", "bias")}
    expected.update({f"lm_heads.{h}.weight": (V, H) for h in range(5)})
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # as stored; vLLM casts to the model dtype

    source = load_heads(faster_decoding, H)
    back, lm_head = load_vllm_heads(out)
    assert lm_head is None and not back.shared_lm_head and back.n_heads == 5
    hidden = _hidden()
    assert torch.equal(source.topk(hidden, None, K), back.topk(hidden, None, K))


def test_shared_round_trip_with_proposal_vocabulary(shared, tmp_path):
    folder, weight, vocab = shared
    out = export_vllm(folder, tmp_path / "vllm", BaseLMHead(weight, V, "tiny-base"))
    config = json.loads((out / "config.json").read_text())
    assert config["original_lm_head"] is True and config["medusa_fc_bias"] is True
    assert config["num_heads"] == 3 and config["num_hidden_layers"] == 2
    assert config["vocab_size"] == V and config["truncated_vocab_size"] == len(vocab)
    tensors = load_file(str(out / "model.safetensors"))
    expected = {f"blocks.{h}.layers.{j}.{p}": (H, H) if p == "weight" else (H,)
                for h in range(3) for j in range(2) for p in ("weight", "bias")}
    expected.update({"lm_heads.0.weight": (V, H), "token_map": (len(vocab),)})
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    assert tensors["token_map"].dtype == torch.int64 and tensors["token_map"].tolist() == vocab
    assert tensors["lm_heads.0.weight"].dtype == torch.float32  # the base model's, unchanged
    assert tensors["blocks.0.layers.0.weight"].dtype == torch.bfloat16

    source = load_heads(folder, H)
    back, lm_head = load_vllm_heads(out)
    assert back.shared_lm_head and back.proposal_vocab.tolist() == vocab
    hidden = _hidden()
    want = source.topk(hidden, _linear(weight), K)
    assert set(want.flatten().tolist()) <= set(vocab)
    assert torch.equal(want, back.topk(hidden, lm_head, K))


def test_vllm_chain_draft_equals_nbkit_top1(shared, tmp_path):
    """vLLM's compute_logits with a token_map: the head's logits scattered into a -inf row of the full
    vocabulary, then argmax (MedusaProposer.propose). Same draft as nbkit's top-1."""
    folder, weight, vocab = shared
    out = export_vllm(folder, tmp_path / "vllm", BaseLMHead(weight, V, "tiny-base"))
    tensors = load_file(str(out / "model.safetensors"))
    back, _ = load_vllm_heads(out)
    token_map = tensors["token_map"]
    hidden = _hidden()
    drafts = []
    for head in back.heads:
        logits = torch.full((hidden.shape[0], V), -torch.inf)
        logits[:, token_map] = head(hidden) @ tensors["lm_heads.0.weight"][token_map].T
        drafts.append(logits.argmax(-1))
    assert torch.equal(torch.stack(drafts, 1), load_heads(folder, H).topk(hidden, _linear(weight), 1)[..., 0])


def test_full_vocab_drops_the_token_map(shared, tmp_path):
    folder, weight, _ = shared
    out = export_vllm(folder, tmp_path / "vllm", BaseLMHead(weight, V, "tiny-base"), full_vocab=True)
    assert json.loads((out / "config.json").read_text())["truncated_vocab_size"] is None
    assert "token_map" not in load_file(str(out / "model.safetensors"))
    readme = (out / "README.md").read_text()
    assert "enable_weights_track" not in readme.split("## Several")[0].split("```bash")[1]
    back, lm_head = load_vllm_heads(out)
    heads = load_heads(folder, H)
    heads.proposal_vocab = None
    hidden = _hidden()
    assert torch.equal(heads.topk(hidden, _linear(weight), K), back.topk(hidden, lm_head, K))


def test_readme_has_the_launch_commands(shared, tmp_path):
    folder, weight, _ = shared
    out = export_vllm(folder, tmp_path / "vllm", BaseLMHead(weight, V, "org/base"), tensor_parallel=4,
                      speculative_tokens=2)
    readme = (out / "README.md").read_text()
    spec = json.dumps({"method": "medusa", "model": str(out.resolve()), "num_speculative_tokens": 2})
    assert f"vllm serve org/base --tensor-parallel-size 4 --speculative-config '{spec}'" in readme
    assert "--distributed-executor-backend ray" in readme and "ray start --head" in readme
    assert """--model-loader-extra-config '{"enable_weights_track": false}'""" in readme
    assert f"vllm=={VLLM_VERSION}" in readme and "chain" in readme and "adaptive" in readme


# --- refusals -----------------------------------------------------------------------------------------
def test_refuses_what_vllm_cannot_express(shared, faster_decoding, tmp_path):
    folder, weight, _ = shared
    with pytest.raises(HeadsFormatError, match="share the base model's lm_head"):
        export_vllm(folder, tmp_path / "a")
    with pytest.raises(HeadsFormatError, match="proposal vocabulary holds token"):
        export_vllm(folder, tmp_path / "b", BaseLMHead(weight[:40], 40, "small"))
    with pytest.raises(HeadsFormatError, match="expected"):
        export_vllm(folder, tmp_path / "c", BaseLMHead(weight[:, :8], V, "narrow"))
    with pytest.raises(HeadsFormatError, match="vocab_size is 65"):
        export_vllm(faster_decoding, tmp_path / "d", BaseLMHead(None, V + 1, "other"))
    with pytest.raises(HeadsFormatError, match="num_speculative_tokens must be 1..5"):
        export_vllm(faster_decoding, tmp_path / "e", speculative_tokens=6)


def test_reader_rejects_a_broken_export(faster_decoding, tmp_path):
    out = export_vllm(faster_decoding, tmp_path / "vllm")
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "lm_heads.4.weight"}, str(out / "model.safetensors"))
    with pytest.raises(HeadsFormatError, match="lm_heads.4.weight"):
        load_vllm_heads(out)
    save_file({**tensors, "blocks.0.extra": tensors["blocks.0.layers.0.bias"].clone()}, str(out / "model.safetensors"))
    with pytest.raises(HeadsFormatError, match="no parameter for key 'blocks.0.extra'"):
        load_vllm_heads(out)


# --- command line ---------------------------------------------------------------------------------------
def _base_folder(tmp_path: Path, weight: torch.Tensor, **config) -> Path:
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": weight.shape[0], "hidden_size": H, **config}))
    save_file({"lm_head.weight": weight.contiguous()}, str(folder / "model.safetensors"))
    return folder


def test_cli_exports_both_formats(shared, faster_decoding, tmp_path, capsys):
    folder, weight, vocab = shared
    base = _base_folder(tmp_path, weight)
    assert main(["export", str(folder), str(tmp_path / "s"), "--to", "vllm", "--model", str(base),
                 "--base-name", "org/base", "--num-speculative-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "vllm serve org/base --tensor-parallel-size 1" in printed and '"num_speculative_tokens": 2' in printed
    back, lm_head = load_vllm_heads(tmp_path / "s")
    hidden = _hidden()
    assert torch.equal(load_heads(folder, H).topk(hidden, _linear(weight), K), back.topk(hidden, lm_head, K))
    assert main(["export", str(faster_decoding / "medusa_lm_head.pt"), str(tmp_path / "f"), "--to", "vllm"]) == 0
    assert json.loads((tmp_path / "f" / "config.json").read_text())["num_heads"] == 5


def test_cli_refuses_clearly(shared, tmp_path, capsys):
    folder, weight, _ = shared
    assert main(["export", str(folder), str(tmp_path / "a"), "--to", "vllm"]) == 2
    assert "give the base model (--model)" in capsys.readouterr().err
    assert main(["export", str(folder), str(tmp_path / "b"), "--to", "tgi"]) == 2
    assert "only 'vllm'" in capsys.readouterr().err
    base = _base_folder(tmp_path, weight)
    save_file({"lm_head.weight": weight, "lm_head.bias": torch.zeros(V)}, str(base / "model.safetensors"))
    assert main(["export", str(folder), str(tmp_path / "c"), "--to", "vllm", "--model", str(base)]) == 2
    assert "has a bias" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "d"), "--to", "vllm"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_reads_a_tied_lm_head(shared, tmp_path):
    folder, weight, _ = shared
    base = tmp_path / "tied"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"vocab_size": V, "hidden_size": H, "tie_word_embeddings": True}))
    save_file({"model.embed_tokens.weight": weight.contiguous()}, str(base / "model.safetensors"))
    assert main(["export", str(folder), str(tmp_path / "t"), "--to", "vllm", "--model", str(base)]) == 0
    assert torch.equal(load_file(str(tmp_path / "t" / "model.safetensors"))["lm_heads.0.weight"], weight)


# --- vLLM's own code, from a side venv (scripts/vllm_side_venv.sh); `make test` builds it and sets the variable ---
VLLM_PYTHON = os.environ.get("NBKIT_VLLM_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON, reason="needs NBKIT_VLLM_PYTHON, a side venv's python with "
                    f"vllm=={VLLM_VERSION}: `make test` and `make test-vllm` build one and set it")
@pytest.mark.parametrize("source", ["faster_decoding", "shared"])
def test_vllm_real_code_loads_and_drafts_the_same(source, request, tmp_path):
    if source == "faster_decoding":
        folder = request.getfixturevalue("faster_decoding")
        out, lm_head = export_vllm(folder, tmp_path / "vllm"), None
    else:
        folder, weight, _ = request.getfixturevalue("shared")
        out, lm_head = export_vllm(folder, tmp_path / "vllm", BaseLMHead(weight, V, "b")), _linear(weight)
    hidden = _hidden(8)
    save_file({"hidden": hidden}, str(tmp_path / "hidden.safetensors"))
    run = subprocess.run([VLLM_PYTHON, str(ROOT / "scripts" / "vllm_cpu_check.py"), str(out),
                          str(tmp_path / "hidden.safetensors")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["vllm_version"] == VLLM_VERSION
    config = json.loads((out / "config.json").read_text())
    assert report["config"] == {k: config[k] if config[k] is not None else config["vocab_size"]
                                for k in report["config"]}
    assert set(report["loaded"]) == set(report["params"]) - {"token_map"}
    if (out / PROPOSAL_FILE).exists() or config["truncated_vocab_size"]:
        assert "token_map" in report["weights_track"]  # vLLM's strict check: why the launch flag is needed
    else:
        assert report["weights_track"] == "ok"
    want = load_heads(folder, H).topk(hidden, lm_head, 1)[..., 0]
    assert report["draft_tokens"] == want.tolist()

