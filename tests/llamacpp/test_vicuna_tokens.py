"""On the vicuna miniature's GGUF, nbkit's prompt ids equal llama.cpp's own sentencepiece tokenization
(raw prompts with BOS; vicuna conversations with `</s>` between turns, parsed as special), and the HF
tokenizer read back from the GGUF agrees with the repository's tokenizer.model."""

from __future__ import annotations

import pytest
from vicuna_mini import BASE_ID

from nbkit.chat_format import VICUNA_SYSTEM, chat_prompt_ids, prompt_ids, vicuna_text
from nbkit.notebook import hub

pytest.importorskip("llama_cpp", reason="the llama.cpp bindings are not installed")

# Not compared: a prompt that starts with a space (sentencepiece and llama.cpp write "▁▁", transformers' fast
# tokenizer one "▁"); raw prompts keep `tokenizer(prompt)` semantics there.
RAW = ["Hello there", "Once upon a time a brown fox", "émoji 🙂 and digits 12345", "two  spaces, tab\tand\nline"]
CONVERSATIONS = [
    [{"role": "user", "content": "Where does the owl sing?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 12"}, {"role": "user", "content": "And now? é"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
]


@pytest.fixture(scope="module")
def tokenizers(vicuna_mirror):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from nbkit.gguf.files import gguf_tokenizer

    gguf = hub.serving_gguf(hub.download_model(BASE_ID, mirror=vicuna_mirror), "q8_0")
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    return llm, gguf_tokenizer(gguf), AutoTokenizer.from_pretrained(vicuna_mirror / BASE_ID)


def test_raw_prompts_match_llama_cpp(tokenizers):
    llm, from_gguf, from_repo = tokenizers
    for text in RAW:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert prompt_ids(from_gguf, text) == ids == prompt_ids(from_repo, text), text


def test_vicuna_conversations_match_llama_cpp(tokenizers):
    llm, from_gguf, from_repo = tokenizers
    for messages in CONVERSATIONS:
        text = vicuna_text(messages)
        assert text.startswith(VICUNA_SYSTEM) or text.startswith("Be brief.")
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert chat_prompt_ids(from_gguf, messages) == ids == chat_prompt_ids(from_repo, messages), text
