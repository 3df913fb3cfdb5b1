"""Prefix reuse on the llama.cpp engine (embedded SmolLM2 GGUF): a conversation's next turn and prompts that share a
prefix in one batch give the same greedy tokens as without reuse, in exact mode (Medusa trees on) and fast mode."""

import os

import pytest

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")  # ggml threads spin at barriers: one is faster on a busy CPU

from nbkit.chat_format import chat_prompt_ids
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel

pytestmark = pytest.mark.slow

CHEAP = CostModel.from_function(lambda n: 0.01)  # adaptive policy: trees always pay
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
SHORT = SamplingParams(max_tokens=8, ignore_eos=True)
QUESTIONS = ["Name three colors.", "Which one is the warmest?"]


def engine(prefix_cache: bool, exact: bool, heads=None, **kw):
    return load_engine("llamacpp", None, heads=heads, max_batch=4, exact=exact, cost_model=CHEAP,
                       prefix_cache=prefix_cache, self_check=False, **kw)


@pytest.fixture(scope="module")
def reference():
    """Exact mode without heads and without reuse: what every configuration below must say."""
    return engine(False, True, heads="none", speculation="off")


def conversation(e, reference, turns=QUESTIONS):
    """Each turn's prompt is the conversation so far; returns the turns' Finished and the reference's tokens."""
    messages, outs, refs = [], [], []
    for q in turns:
        messages.append({"role": "user", "content": q})
        ids = chat_prompt_ids(e.tokenizer, messages)
        outs.append(e.generate(ids, GREEDY))
        refs.append(reference.generate(ids, GREEDY).token_ids)
        messages.append({"role": "assistant", "content": outs[-1].text})
    return outs, refs


def test_later_turns_reuse_the_conversation_and_say_the_same_exact(reference):
    e = engine(True, True)  # the shipped heads, trees on
    outs, refs = conversation(e, reference)
    assert [o.token_ids for o in outs] == refs
    assert outs[0].cached_tokens == 0 and all(o.cached_tokens > 20 for o in outs[1:])
    assert e.snapshot()["prefix_hits"] == 1 and 0 < e.snapshot()["prefix_hit_rate"] < 1


def test_later_turns_reuse_the_conversation_in_fast_mode():
    """Fast mode promises nothing (its guarantee says so): a reused prefix was computed in other ubatches than a
    whole-prompt prefill, so a near-tie may flip (here the second turn's 8th token of 16). Reuse still starts
    from the right KV: the first tokens agree, where a wrong prefix (positions, cells) would answer garbage."""
    e = engine(True, False, heads="none", speculation="off")
    outs, refs = conversation(e, engine(False, False, heads="none", speculation="off"))
    assert outs[0].token_ids == refs[0] and all(o.cached_tokens > 20 for o in outs[1:])
    assert all(o.token_ids[:6] == ref[:6] for o, ref in zip(outs, refs))
    assert "prefix reuse" in e.runner.guarantee


def test_shared_prefixes_in_one_batch_exact(reference):
    """Three questions after one long system prompt and one prompt three times (n choices), all at once, with
    Medusa trees: each equals the reference alone, and the shared tokens were prefilled once."""
    e = engine(True, True)
    tok = e.tokenizer
    system = "You are a careful assistant. Answer in one short sentence, plainly, and never use lists."

    def chat(q):
        return chat_prompt_ids(tok, [{"role": "system", "content": system}, {"role": "user", "content": q}])

    prompts = [chat(q) for q in QUESTIONS] + [chat("Say hello.")] * 3
    handles = [e.submit(p, SHORT) for p in prompts]
    while any(h.finished is None for h in handles):
        e.step()
    outs = [h.result() for h in handles]
    refs = [reference.generate(p, SHORT).token_ids for p in prompts[:3]]
    assert [o.token_ids for o in outs] == refs + refs[2:] * 2
    assert outs[0].cached_tokens == 0 and min(o.cached_tokens for o in outs[1:]) > 20
    assert outs[3].cached_tokens == outs[4].cached_tokens == len(prompts[2]) - 1  # the n choices' prompt: once
    assert e.counters["prefill_tokens"] == sum(map(len, prompts)) - sum(o.cached_tokens for o in outs)


def test_retained_cells_are_evicted_under_a_small_budget(reference, caplog):
    """A context of 512 cells (llama.cpp's least) holds two finished 190-token requests' KV, not three: the least
    recently used is evicted before a request would wait or the context fill up (which would cost exact mode
    its cell order), and the tokens stay those of the reference."""
    e = engine(True, True, heads="none", speculation="off", n_ctx=512)
    text = " ".join(f"{n} sheep." for n in range(1, 60))
    prompts = [e.encode(f"Story {k}: {text}")[:180] for k in "ABC"]
    params = SHORT
    outs = [e.generate(p, params) for p in prompts]
    assert e.prefix.evictions == 1 and list(e.prefix.retained) != []
    again = e.generate(prompts[2], params)
    assert again.cached_tokens == len(prompts[2]) - 1 and again.token_ids == outs[2].token_ids
    assert [o.token_ids for o in outs] == [reference.generate(p, params).token_ids for p in prompts]
    assert "context full" not in caplog.text
    e.prefix.clear(e)
    assert e.runner.seq_ranges() == {} and e.runner.kv_parked == 0
