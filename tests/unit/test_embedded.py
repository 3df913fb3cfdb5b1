"""The embedded SmolLM2-135M-Instruct with the shipped heads, and the vicuna miniature with its
FasterDecoding-format heads (a sentencepiece tokenizer, no chat template), fp32: Medusa changes speed,
never text."""

from types import SimpleNamespace

import pytest
import torch
from vicuna_mini import BASE_ID, HEADS_ID

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",  # a short answer: EOS arrives in the middle of an accepted path
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
]
VICUNA_PROMPTS = ["Where does the owl sing?", "Tell me a story about a lion.", "What color is the fox?"]
MAX_TOKENS = 40


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def vicuna_chat_ids(tokenizer, prompt):
    """FastChat's vicuna_v1.1 rendering, tokenized as FastChat does (`<s>` from the tokenizer)."""
    from nbkit.chat_format import VICUNA_SYSTEM

    return tokenizer(f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:")["input_ids"]


@pytest.fixture(scope="module", params=["smollm2", "vicuna"])
def subject(request):
    """(model, tokenizer), heads, prompts and their chat ids, for each model."""
    if request.param == "smollm2":
        embedded = request.getfixturevalue("embedded")
        return SimpleNamespace(pair=embedded, heads=request.getfixturevalue("embedded_heads"), prompts=PROMPTS,
                               chat_ids=lambda p: chat_ids(embedded[1], p))
    from nbkit.medusa.heads import load_heads
    from nbkit.models import load_model

    mirror = request.getfixturevalue("vicuna_mirror")
    model, tok = load_model(mirror / BASE_ID)
    return SimpleNamespace(pair=(model, tok), heads=load_heads(mirror / HEADS_ID, model.config.hidden_size),
                           prompts=VICUNA_PROMPTS, chat_ids=lambda p: vicuna_chat_ids(tok, p))


@pytest.fixture(scope="module")
def references(subject):
    model, tok = subject.pair
    refs = []
    for p in subject.prompts:
        ids = subject.chat_ids(p)
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        refs.append(out[0, len(ids):].tolist())
    return refs


def engine_for(embedded, heads, speculation, slots=4):
    model, tok = embedded
    cheap = CostModel.from_function(lambda n: 0.03 + 0.0005 * n)  # GPU-like: trees are cheap
    return Engine(TorchRunner(model, max_slots=slots), tok, heads, speculation=speculation, cost_model=cheap)


def test_plain_engine_equals_hf_generate(subject, references):
    engine = engine_for(subject.pair, None, "off")
    for p, ref in zip(subject.prompts, references):
        assert engine.generate(subject.chat_ids(p), SamplingParams(max_tokens=MAX_TOKENS)).token_ids == ref


@pytest.mark.parametrize("speculation", ["mc_sim_7b_63", "chain-3", "adaptive"])
def test_medusa_equals_plain_greedy(subject, references, speculation):
    engine = engine_for(subject.pair, subject.heads, speculation)
    accepted = []
    for p, ref in zip(subject.prompts, references):
        out = engine.generate(subject.chat_ids(p), SamplingParams(max_tokens=MAX_TOKENS))
        assert out.token_ids == ref
        accepted.append(out.mean_accepted)
    assert references[0][-1] == subject.pair[1].eos_token_id  # the EOS case really is one
    assert max(accepted) > 1.3  # the heads do propose tokens that get accepted (plain decoding: 1.0)


def test_batch_equals_solo(subject, references):
    engine = engine_for(subject.pair, subject.heads, "adaptive", slots=4)
    settings = [dict(max_tokens=MAX_TOKENS), dict(max_tokens=MAX_TOKENS, speculate=False),
                dict(max_tokens=17, tree="mc_sim_7b_63")]
    handles = []
    for p, s in zip(subject.prompts, settings):
        handles.append(engine.submit(subject.chat_ids(p), SamplingParams(**s)))
        engine.step()  # staggered arrivals
    while not all(h.finished for h in handles):
        engine.step()
    for h, ref, s in zip(handles, references, settings):
        assert h.result().token_ids == ref[: s["max_tokens"]]
