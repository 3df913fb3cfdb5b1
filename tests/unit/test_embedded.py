"""The embedded SmolLM2-135M-Instruct with the shipped heads, fp32: Medusa changes speed, never text."""

import pytest
import torch

from nbkit.engine.engine import Engine
from nbkit.engine.policy import CostModel
from nbkit.engine.request import SamplingParams
from nbkit.engine.torch_runner import TorchRunner

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",  # a short answer: EOS arrives in the middle of an accepted path
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
]
MAX_TOKENS = 40


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def references(embedded):
    model, tok = embedded
    refs = []
    for p in PROMPTS:
        ids = chat_ids(tok, p)
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        refs.append(out[0, len(ids):].tolist())
    return refs


def engine_for(embedded, heads, speculation, slots=4):
    model, tok = embedded
    cheap = CostModel.from_function(lambda n: 0.03 + 0.0005 * n)  # GPU-like: trees are cheap
    return Engine(TorchRunner(model, max_slots=slots), tok, heads, speculation=speculation, cost_model=cheap)


def test_plain_engine_equals_hf_generate(embedded, references):
    engine = engine_for(embedded, None, "off")
    for p, ref in zip(PROMPTS, references):
        assert engine.generate(chat_ids(embedded[1], p), SamplingParams(max_tokens=MAX_TOKENS)).token_ids == ref


@pytest.mark.parametrize("speculation", ["mc_sim_7b_63", "chain-3", "adaptive"])
def test_medusa_equals_plain_greedy(embedded, embedded_heads, references, speculation):
    engine = engine_for(embedded, embedded_heads, speculation)
    accepted = []
    for p, ref in zip(PROMPTS, references):
        out = engine.generate(chat_ids(embedded[1], p), SamplingParams(max_tokens=MAX_TOKENS))
        assert out.token_ids == ref
        accepted.append(out.mean_accepted)
    assert references[0][-1] == embedded[1].eos_token_id  # the EOS case really is one
    assert max(accepted) > 1.3  # the heads do propose tokens that get accepted (plain decoding: 1.0)


def test_batch_equals_solo(embedded, embedded_heads, references):
    engine = engine_for(embedded, embedded_heads, "adaptive", slots=4)
    settings = [dict(max_tokens=MAX_TOKENS), dict(max_tokens=MAX_TOKENS, speculate=False),
                dict(max_tokens=17, tree="mc_sim_7b_63")]
    handles = []
    for p, s in zip(PROMPTS, settings):
        handles.append(engine.submit(chat_ids(embedded[1], p), SamplingParams(**s)))
        engine.step()  # staggered arrivals
    while not all(h.finished for h in handles):
        engine.step()
    for h, ref, s in zip(handles, references, settings):
        assert h.result().token_ids == ref[: s["max_tokens"]]
