"""`python -m nbkit generate` on the vicuna miniature: a raw prompt is `<s>` + prompt, a chat prompt is
vicuna's conversation, and Medusa's greedy answer equals transformers' greedy answer."""

from __future__ import annotations

import json

import pytest
import torch
from vicuna_mini import BASE_ID, HEADS_ID

from nbkit.chat_format import VICUNA_SYSTEM
from nbkit.cli import main

pytestmark = pytest.mark.slow


def run(capsys, *args) -> dict:
    assert main(["generate", "--json", "--max-tokens", "16", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("raw", [True, False])
def test_generate_on_vicuna(vicuna_mirror, capsys, monkeypatch, raw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, heads_dir = vicuna_mirror / BASE_ID, vicuna_mirror / HEADS_ID
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "Where does the owl sing?"
    text = prompt if raw else f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:"
    ids = [1] + tok(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setenv("NBKIT_HUB_MIRROR", str(vicuna_mirror))
    names = (BASE_ID, HEADS_ID) if raw else (str(model_dir), str(heads_dir))  # hub ids and local folders
    out = run(capsys, "--model", names[0], "--heads", names[1], "--prompt", prompt,
              "--tree", "mc_sim_7b_63", *(["--raw"] if raw else []))
    assert out["prompt_tokens"] == len(ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    # transformers keeps the EOS (id 2) and stops there; nbkit reports the answer without it, finish "eos_token"
    want = ref[: ref.index(2)] if 2 in ref else ref
    assert out["finish_reason"] == ("eos_token" if 2 in ref else "length"), (out, ref)
    assert out["token_ids"] == want and out["new_tokens"] == len(want)
