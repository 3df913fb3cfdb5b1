"""The vicuna miniature is faithful to the two real repositories' layouts, and good enough to test on:
its tokenizer is vicuna's kind (sentencepiece, BOS added, no chat template), greedy answers are text, and
its 5 heads (config says 2) predict the model's own continuation often but not always."""

from __future__ import annotations

import json

import pytest
import torch
from vicuna_mini import BASE_ID, HEADS_ID

from nbkit.notebook import hub

# Loading the miniature takes seconds; the first use builds it (a minute of CPU).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mini(vicuna_mirror):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = vicuna_mirror / BASE_ID
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_layout_matches_the_hub_repositories(vicuna_mirror):
    base = sorted(p.name for p in (vicuna_mirror / BASE_ID).iterdir())
    assert base == ["config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
                    "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
                    "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((vicuna_mirror / BASE_ID / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "num_key_value_heads" not in config
    tok_config = json.loads((vicuna_mirror / BASE_ID / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and tok_config["add_bos_token"] is True
    assert "chat_template" not in tok_config
    index = json.loads((vicuna_mirror / BASE_ID / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == base[2:4]
    heads = sorted(p.name for p in (vicuna_mirror / HEADS_ID).iterdir())
    assert heads == ["config.json", "medusa_lm_head.pt"]
    assert json.loads((vicuna_mirror / HEADS_ID / "config.json").read_text())["medusa_num_heads"] == 2
    state = torch.load(vicuna_mirror / HEADS_ID / "medusa_lm_head.pt", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert sorted(k for k in state if k.endswith(".1.weight")) == [f"{i}.1.weight" for i in range(5)]


def test_mirror_serves_the_real_ids(vicuna_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(vicuna_mirror))
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path))
    assert (hub.download_model(BASE_ID) / "tokenizer.model").is_file()
    info = hub.inspect_heads(hub.download_heads(HEADS_ID), hub.download_model(BASE_ID))
    assert (info.n_heads, info.config_heads) == (5, 2)


def test_tokenizer_is_vicunas_kind(mini):
    _, tok = mini
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.chat_template is None
    ids = tok("Hello é")["input_ids"]
    assert ids[0] == 1 and 2 not in ids
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte fallback
    assert tok.decode(ids, skip_special_tokens=True) == "Hello é"


def test_greedy_is_text_and_heads_are_accepted_sometimes(mini, vicuna_mirror):
    from vicuna_mini import SYSTEM

    from nbkit.medusa.heads import load_heads

    model, tok = mini
    heads = load_heads(vicuna_mirror / HEADS_ID, model.config.hidden_size)
    ids = tok(f"{SYSTEM} USER: Where does the owl sing? ASSISTANT:")["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    text = tok.decode(out, skip_special_tokens=True)
    assert len(set(out)) > 8 and "owl" in text, text
    seq = ids + out
    with torch.no_grad():
        logits = heads(model.model(input_ids=torch.tensor([seq])).last_hidden_state[0], model.lm_head)
    hits = [float((logits[0, t].argmax() == seq[t + 2]).item()) for t in range(len(ids) - 1, len(seq) - 2)]
    assert 0.3 < sum(hits) / len(hits) < 1.0
