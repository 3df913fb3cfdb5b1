"""A faithful miniature of `lmsys/vicuna-7b-v1.3` and `FasterDecoding/medusa-vicuna-7b-v1.3`, built offline.

It is written as a hub-mirror tree (`<root>/<owner>/<name>/...`, what nbkit.hub reads with
$NBKIT_HUB_MIRROR), so code and notebooks run with the real ids and the real file layout:

- the base model: LlamaForCausalLM with vicuna-7b-v1.3's config keys at a tiny size, a real sentencepiece
  `tokenizer.model` trained here (`<unk>`=0, `<s>`=1, `</s>`=2, byte fallback), a `tokenizer_config.json`
  like vicuna's (LlamaTokenizer, add_bos_token true, NO chat_template, no tokenizer.json), and fp16 weights
  only as two `pytorch_model-0000N-of-00002.bin` shards (with the old `rotary_emb.inv_freq` buffers, as
  transformers 4.28 saved them) plus `pytorch_model.bin.index.json`;
- the heads: `medusa_lm_head.pt` in bf16 with 5 heads (`{i}.0.linear.weight/bias`, `{i}.1.weight`) and a
  config.json that claims `medusa_num_heads: 2`, like FasterDecoding's.

The base model is trained for a few seconds on a small vicuna-style chat corpus, so greedy answers are text,
not one repeated token; the heads are trained on the same corpus (head i predicts token t+2+i from the base
model's final hidden state), so Medusa trees get accepted often but not always.

Usable without pytest: `python -m tests.vicuna_mini OUT_DIR` writes the mirror into OUT_DIR.
`cached_mirror()` builds once per BUILDER_VERSION under $NBKIT_CACHE_DIR.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

BASE_ID = "lmsys/vicuna-7b-v1.3"
HEADS_ID = "FasterDecoding/medusa-vicuna-7b-v1.3"
# Bump when anything below changes what is written: cached builds are keyed by it.
BUILDER_VERSION = 2

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
N_HEADS = 5
VOCAB = 512
HIDDEN = 128
LAYERS = 2
ATTN_HEADS = 4
FFN = 352  # a multiple of 32, so every weight row quantizes to Q8_0 blocks

# --- the corpus -------------------------------------------------------------------------------------------
_ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "lion", "whale", "bird", "mouse"]
_PLACES = ["garden", "forest", "river", "city", "house", "field", "mountain", "lake"]
_VERBS = ["sleep", "run", "play", "sing", "read", "swim", "walk", "rest"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange"]
_PROSE = """The quick brown fox jumps over the lazy dog. A language model reads a prompt and predicts the next token.
Medusa adds several decoding heads to a model. Each head guesses a token further ahead, and the model checks
all the guesses in one step. When a guess is right, the model writes more than one token per step.
Vicuna is a chat assistant trained on conversations that users shared. It answers questions, writes stories,
explains ideas and helps with code. The weather today is sunny and warm, with a light wind from the west.
Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Python is a programming language; def main(): return 42.
Once upon a time there was a small village near a big river. The people of the village grew apples and
wheat, and every autumn they held a festival with music, bread and cider."""


def corpus(n_chats: int = 120, seed: int = 0) -> list[str]:
    """Vicuna v1.1 conversations (system line, `USER: ... ASSISTANT: ...</s>`) and some prose, a few KB."""
    rng = random.Random(seed)
    texts = [p.strip() for p in _PROSE.split("\n") if p.strip()]
    for _ in range(n_chats):
        a, p, v, c = rng.choice(_ANIMALS), rng.choice(_PLACES), rng.choice(_VERBS), rng.choice(_COLORS)
        question, answer = rng.choice([
            (f"Where does the {a} {v}?", f"The {a} likes to {v} in the {p}. It is a quiet place for a {a}."),
            (f"What color is the {a}?", f"The {a} is {c}. Many people think a {c} {a} is beautiful."),
            (f"Tell me a story about a {a}.",
             f"Once upon a time a {c} {a} lived in the {p}. Every day the {a} would {v} and then rest."),
            (f"Can a {a} {v}?", f"Yes, a {a} can {v}. The {a} usually does it in the {p}."),
        ])
        texts.append(f"{SYSTEM} USER: {question} ASSISTANT: {answer}</s>")
    return texts


# --- the tokenizer ----------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str]) -> bytes:
    """A Llama-style sentencepiece BPE model (the options of Llama's tokenizer.model, a small vocab)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("</s>", "") for t in texts] * 4), model_writer=out,
        model_type="bpe", vocab_size=VOCAB, character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        max_sentence_length=4096, minloglevel=2,
    )
    return out.getvalue()


def encode_corpus(sp_model: bytes, texts: list[str]) -> list[list[int]]:
    """Token ids as vicuna training saw them: `<s>` first, `</s>` (id 2) after each assistant answer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    seqs = []
    for text in texts:
        ids = [1]
        for i, part in enumerate(text.split("</s>")):
            if i:
                ids.append(2)
            if part:
                ids += sp.encode(part)
        seqs.append(ids)
    return seqs


def fastchat_ids(tok, text: str) -> list[int]:
    """The ids vicuna trained on for a rendered conversation, built by hand for tests: FastChat called the
    legacy LlamaTokenizer, which split the text at `</s>` and tokenized each segment on its own (each with
    sentencepiece's word-start marker), BOS first. (transformers 5's fast tokenizer differs after `</s>`.)"""
    out = [1]
    for i, segment in enumerate(text.split("</s>")):
        out += ([2] if i else []) + (list(tok(segment, add_special_tokens=False)["input_ids"]) if segment else [])
    return out


# --- the models -------------------------------------------------------------------------------------------
def vicuna_config() -> dict:
    """vicuna-7b-v1.3's config.json key set (transformers 4.28), tiny sizes."""
    return {
        "_name_or_path": "vicuna-7b-v1.3", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": FFN, "max_position_embeddings": 2048, "model_type": "llama",
        "num_attention_heads": ATTN_HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.28.1",
        "use_cache": True, "vocab_size": VOCAB,
    }


def _batches(seqs: list[list[int]], rng: random.Random, batch: int, length: int):
    stream = [t for s in seqs for t in s]
    while True:
        starts = [rng.randrange(0, len(stream) - length - 1) for _ in range(batch)]
        yield torch.tensor([stream[s : s + length] for s in starts])


def train(seqs: list[list[int]], steps: int = 300, seed: int = 0):
    """The base model and 5 Medusa heads, trained together on the corpus (heads on detached hidden states,
    so they do not change the base model). Returns (model, heads as a ModuleList of upstream layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in vicuna_config().items() if k not in ("_name_or_path", "architectures", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    heads = torch.nn.ModuleList(_upstream_head() for _ in range(N_HEADS))
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    xent = torch.nn.functional.cross_entropy
    model.train()
    for _, ids in zip(range(steps), _batches(seqs, random.Random(seed), batch=12, length=64)):
        hidden = model.model(input_ids=ids).last_hidden_state
        loss = xent(model.lm_head(hidden)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        h = hidden.detach()
        for i, head in enumerate(heads):  # head i at position t predicts token t+2+i
            loss = loss + xent(head(h)[:, : -(2 + i)].flatten(0, 1), ids[:, 2 + i :].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), heads.eval()


class _ResBlock(torch.nn.Module):
    """FasterDecoding's ResBlock (x + SiLU(Linear(x))): its parameter names give the upstream keys."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)
        torch.nn.init.zeros_(self.linear.weight)  # upstream starts each block as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.silu(self.linear(x))


def _upstream_head() -> torch.nn.Sequential:
    return torch.nn.Sequential(_ResBlock(), torch.nn.Linear(HIDDEN, VOCAB, bias=False))


# --- writing the mirror -----------------------------------------------------------------------------------
def _token(content: str, typed: bool = True) -> dict:
    return {**({"__type": "AddedToken"} if typed else {}), "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_base(out: Path, model, sp_model: bytes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vicuna_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "transformers_version": "4.28.1"}, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(sp_model)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": _token("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": _token("</s>"),
        "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": _token("<unk>")}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": _token("<s>", False), "eos_token": _token("</s>", False), "pad_token": "<unk>",
        "unk_token": _token("<unk>", False)}, indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    head_dim = HIDDEN // ATTN_HEADS
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(LAYERS):  # transformers 4.28 saved this buffer in every layer; loaders must skip it
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    keys = sorted(state, key=lambda k: (k != "model.embed_tokens.weight", k.startswith("lm_head"),
                                        k.startswith("model.norm"), k))
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        name = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in shard}, out / name)
        for k in shard:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_heads(out: Path, heads: torch.nn.ModuleList) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in heads.state_dict().items()}
    torch.save(state, out / "medusa_lm_head.pt")
    (out / "config.json").write_text(json.dumps({
        "base_model_name_or_path": BASE_ID, "medusa_num_heads": 2, "medusa_num_layers": 1,
        "transformers_version": "4.31.0"}, indent=2) + "\n")


def build_mirror(root: str | os.PathLike, steps: int = 300) -> Path:
    """Write both repositories under `root` (a hub-mirror tree) and return `root`."""
    root = Path(root)
    texts = corpus()
    sp_model = train_tokenizer(texts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and cheap: the ops are tiny
    try:
        model, heads = train(encode_corpus(sp_model, texts), steps=steps)
    finally:
        torch.set_num_threads(threads)
    write_base(root / BASE_ID, model, sp_model)
    write_heads(root / HEADS_ID, heads)
    return root


def cached_mirror(cache: str | os.PathLike | None = None) -> Path:
    """The mirror built once per BUILDER_VERSION under $NBKIT_CACHE_DIR (atomically: concurrent builders race
    to rename a finished temporary folder; the loser's copy is dropped)."""
    from nbkit.models import cache_dir

    base = Path(cache) if cache else cache_dir()
    final = base / "vicuna-mini" / f"v{BUILDER_VERSION}"
    if (final / HEADS_ID / "medusa_lm_head.pt").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"v{BUILDER_VERSION}.tmp"))
    build_mirror(tmp)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.vicuna_mini OUT_DIR")
    print(build_mirror(sys.argv[1]))
