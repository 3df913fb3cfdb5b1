"""A random-weight Llama of a real model's shape, with a Llama-style tokenizer, built in place (no hub).

gpu_check measures speed and correctness, for which the weights' values do not matter, only their shapes and
dtype: vicuna-7b's shape gives vicuna-7b's bytes per token and kernels. The tokenizer is a small
sentencepiece BPE trained here with Llama's options (`<unk>`=0, `<s>`=1, `</s>`=2, byte fallback); the
model's vocabulary is the real one (32000 for vicuna-7b), so the GGUF converter pads the tokenizer's list
as it does for any model whose vocabulary is larger than its tokenizer's.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

SHAPES = {
    "vicuna-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "vocab_size": 32000},
    # head size 32: llama.cpp's exact mode keeps V in q8_0, whose blocks are 32 wide
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 1024},
}
TOKENIZER_VOCAB = 512
CORPUS = ("The quick brown fox jumps over the lazy dog. A chat between a curious user and an assistant. "
          "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Medusa heads guess tokens further ahead; the model checks "
          "all the guesses in one step. Once upon a time there was a village near a big river. ")
PROMPTS = ("USER: Tell me a story about a fox. ASSISTANT:", "USER: Count to ten. ASSISTANT:",
           "The village near the river", "Medusa heads guess", "A chat between a curious user",
           "Numbers: 1, 2,", "Once upon a time", "The quick brown fox")


def train_tokenizer(out: Path) -> None:
    """tokenizer.model and the config files of a Llama tokenizer (LlamaTokenizer, BOS added)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([CORPUS * 3] * 40), model_writer=model, model_type="bpe",
        vocab_size=TOKENIZER_VOCAB, character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer",
        "clean_up_tokenization_spaces": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def build(out: Path, shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(model on `device` in `dtype`, tokenizer); both saved in `out` (a transformers folder, for the GGUF)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, torch_dtype=str(dtype)[6:])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: vicuna-7b's f16 weights are 13.5 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    train_tokenizer(out)
    return model, AutoTokenizer.from_pretrained(out)
