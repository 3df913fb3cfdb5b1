"""The llama.cpp engine on the embedded SmolLM2 GGUF: exact greedy Medusa, and sequence-id bookkeeping.

Exactness is checked in the runner's exact configuration (see nbkit/engine/llamacpp/runner.py): greedy
Medusa output must equal plain greedy output token for token, for a request alone and for requests
that share steps with others, finish early, and arrive late. The fast configuration's divergence
rate is measured by nbkit/bench/llamacpp.py, not asserted here.
"""

import os
import random
from types import SimpleNamespace

import pytest
import torch
from helpers import OracleHeads

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")  # ggml threads spin at barriers: one is faster on a busy CPU

from nbkit.engine.llamacpp.runner import LlamaCppRunner
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.runner import TreeInput
from nbkit.engine.speculation import CostModel
from nbkit.medusa.heads import MedusaHeads
from nbkit.medusa.trees import build_tree, chain
from nbkit.models import embedded_gguf_path

pytestmark = pytest.mark.slow

CHEAP = CostModel.from_function(lambda n: 0.01)  # adaptive policy: trees always pay
PROMPTS = ["List the first ten prime numbers.", "What is the capital of France?", "Name three colors."]
N_TOKENS = 24


@pytest.fixture(scope="module")
def plain():
    """The reference: no heads, no speculation, the exact configuration."""
    return load_engine("llamacpp", None, heads="none", max_batch=4, speculation="off", exact=True)


@pytest.fixture(scope="module")
def prompt_ids(plain):
    return [plain.encode(p, chat=True) for p in PROMPTS]


@pytest.fixture(scope="module")
def refs(plain, prompt_ids):
    return [plain.generate(ids, SamplingParams(max_tokens=N_TOKENS, ignore_eos=True)).token_ids
            for ids in prompt_ids]


class LlamaOracle(OracleHeads):
    """OracleHeads keyed on llama.cpp's own hidden states: the right token at varying ranks, some misses,
    so verification accepts paths of every length (random heads would accept almost nothing)."""

    def __init__(self, runner: LlamaCppRunner):
        cfg = SimpleNamespace(hidden_size=runner.hidden_size, vocab_size=runner.vocab_size)
        super().__init__(SimpleNamespace(config=cfg, dtype=runner.dtype), n_heads=4, miss_every=5)
        self.runner = runner

    def register(self, prompt_ids, continuation):
        r, seq = self.runner, prompt_ids + continuation
        slot = r.alloc()
        try:
            r.prefill({slot: prompt_ids[:-1]})
            tokens = seq[len(prompt_ids) - 1:]
            _, hidden = r.verify([TreeInput(slot, chain(len(tokens) - 1), tokens)])[slot]
            r.commit({slot: [0]})
        finally:
            r.free(slot)
        for i, t in enumerate(range(len(prompt_ids) - 1, len(seq))):
            self.keys.append(hidden[i].clone())
            self.futures.append(seq[t + 2: t + 2 + self.n_heads])


@pytest.fixture(scope="module")
def medusa(prompt_ids, refs):
    engine = load_engine("llamacpp", None, heads=MedusaHeads(576, 4), max_batch=4, exact=True, cost_model=CHEAP)
    oracle = LlamaOracle(engine.runner)
    for ids, ref in zip(prompt_ids, refs):
        oracle.register(ids, ref)
    engine.heads = oracle
    return engine


def test_embedded_gguf_serves_chat(plain, refs):
    assert plain.runner.model_path.name == "SmolLM2-135M-Instruct.Q8_0.gguf"  # the better-batching copy
    assert plain.runner.vocab_size == 49152 and plain.runner.hidden_size == 576
    assert 2 in plain.eos_ids  # <|im_end|>
    # The HF tokenizer read from the GGUF (chat template included) gives exactly llama.cpp's own tokens,
    # and the first greedy token matches llama-cpp-python's high-level API on the same file with the same cache
    # types (exact mode's f16 K and q8_0 V: the same attention kernel; with its default f16 cache the logits
    # move by up to ~1 and this prompt's top two are 0.03 apart). Later tokens are not compared: another
    # context shape takes other ggml paths.
    import llama_cpp
    from llama_cpp import Llama

    assert (plain.runner.context.k_type, plain.runner.context.v_type) == ("f16", "q8_0")
    llm = Llama(str(plain.runner.model_path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False,
                flash_attn=True, type_k=llama_cpp.GGML_TYPE_F16, type_v=llama_cpp.GGML_TYPE_Q8_0)
    ids = plain.encode(PROMPTS[1], chat=True)
    text = plain.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True,
                                               tokenize=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    first = llm.create_completion(ids, max_tokens=1, temperature=0.0)["choices"][0]["text"]
    assert plain.tokenizer.decode(refs[1][:1]) == first
    # The plain engine with hidden states on (heads present, speculation off) gives the same tokens.
    hidden_on = load_engine("llamacpp", None, heads=MedusaHeads(576, 4), max_batch=2, speculation="off", exact=True)
    assert hidden_on.generate(plain.encode(PROMPTS[0], chat=True),
                              SamplingParams(max_tokens=N_TOKENS, ignore_eos=True)).token_ids == refs[0]


@pytest.mark.parametrize("speculation", ["mc_sim_7b_63", "chain-3", "adaptive"])
def test_medusa_greedy_equals_plain_alone(medusa, prompt_ids, refs, speculation):
    params = {"max_tokens": N_TOKENS, "ignore_eos": True, "tree": None if speculation == "adaptive" else speculation}
    accepted = []
    for ids, ref in zip(prompt_ids, refs):
        out = medusa.generate(ids, SamplingParams(**params))
        assert out.token_ids == ref
        accepted.append(out.mean_accepted)
    # Long paths were accepted, so the carry and leaf bookkeeping was exercised (a chain only holds rank 0).
    assert sum(accepted) / len(accepted) > (1.3 if speculation.startswith("chain") else 2.0)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 40, "seed": 5}], ids=["greedy", "sampled"])
def test_logprobs_equal_with_and_without_speculation(plain, medusa, prompt_ids, sampling):
    """Top 5 per token from the verified tree rows equal plain decoding's (the exact configuration), the greedy
    token first; a sampled request's are after its temperature and top-k."""
    params = dict(max_tokens=N_TOKENS, ignore_eos=True, logprobs=True, top_logprobs=5, **sampling)
    ref = plain.generate(prompt_ids[0], SamplingParams(**params))
    out = medusa.generate(prompt_ids[0], SamplingParams(tree="mc_sim_7b_63", **params))
    assert out.token_ids == ref.token_ids and (out.mean_accepted > 2.0 or sampling)
    for a, b in zip(out.logprobs, ref.logprobs):
        assert len(a.top) == 5 and [t for t, _ in a.top] == [t for t, _ in b.top]
        torch.testing.assert_close(torch.tensor([a.logprob, *(v for _, v in a.top)]),
                                   torch.tensor([b.logprob, *(v for _, v in b.top)]), atol=1e-4, rtol=0)
        assert a.top[0][0] == a.token_id or sampling


def test_medusa_greedy_equals_plain_in_a_batch(medusa, prompt_ids, refs):
    """Requests of different trees share every step; one finishes early, one arrives late."""
    trees = ["mc_sim_7b_63", "none", "chain-3"]
    lengths = [N_TOKENS, 9, N_TOKENS]
    handles = [medusa.submit(ids, SamplingParams(max_tokens=n, ignore_eos=True, tree=t))
               for ids, n, t in zip(prompt_ids, lengths, trees)]
    for _ in range(3):
        medusa.step()
    late = medusa.submit(prompt_ids[1], SamplingParams(max_tokens=N_TOKENS, ignore_eos=True, tree="vicuna_7b_stage2"))
    while any(h.finished is None for h in [*handles, late]):
        medusa.step()
    for h, ref, n in zip(handles, refs, lengths):
        assert h.result().token_ids == ref[:n]
    assert late.result().token_ids == refs[1]
    assert set(medusa.runner.seq_ranges()) - {medusa.runner.context.retired} <= set(medusa.prefix.retained)
    medusa.prefix.clear(medusa)
    assert medusa.runner.seq_ranges() == {}  # idle and nothing kept for reuse: every cell was given back


def _check_cells(runner: LlamaCppRunner, live: set[int]) -> None:
    """Only live slots' home ids hold cells, exactly positions [0, committed length); no leaf id holds any."""
    ranges = runner.seq_ranges()
    retired = {runner.context.retired} if runner.exact else set()
    assert set(ranges) - retired <= live, f"cells held by {set(ranges) - live}"
    for slot in live:
        in_kv = runner.kv_length(slot)
        assert ranges.get(slot, (0, -1)) == (0, in_kv - 1)


@pytest.mark.parametrize("exact", [False, True])
def test_sequence_ids_never_leak(exact):
    """Random trees, random accepted paths, cancellations at any point: the context holds only live cells."""
    rng = random.Random(7)
    runner = LlamaCppRunner(embedded_gguf_path(), max_slots=4, exact=exact, n_ctx=1024)
    shapes = [build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)]), build_tree([(0,), (1,), (2,), (0, 0)]),
              chain(2), chain(0)]
    live: set[int] = set()
    for _ in range(60):
        while len(live) < 4 and rng.random() < 0.5:
            slot = runner.alloc()
            runner.prefill({slot: [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 12))]})
            live.add(slot)
        if not live:
            continue
        items = [TreeInput(s, t, [rng.randrange(100, 40000) for _ in range(t.size)])
                 for s, t in ((s, rng.choice(shapes)) for s in sorted(live))]
        runner.verify(items)
        cancelled = {s for s in live if rng.random() < 0.15}  # cancelled between verify and commit
        accepted = {}
        for item in items:
            if item.slot in cancelled:
                continue
            path, node = [0], 0
            while item.tree.children[node] and rng.random() < 0.6:
                node = rng.choice(list(item.tree.children[node].values()))
                path.append(node)
            accepted[item.slot] = path
        for s in cancelled:
            runner.free(s)
        live -= cancelled
        runner.commit(accepted)
        for s in [s for s in live if runner.length(s) > 200 or rng.random() < 0.1]:
            runner.free(s)
            live.discard(s)
        _check_cells(runner, live)
    for s in list(live):
        runner.free(s)
    assert runner.seq_ranges() == {}
    assert runner.free_leaves == runner.max_leaves


def test_engine_with_cancellations_frees_everything(prompt_ids):
    # Multi-leaf trees (several leaf ids each) come from requests that name one: with untrained heads the
    # policy's lower confidence bound rightly keeps its own choice small.
    cost = CostModel.from_function(lambda n: 0.01 * (1 + n / 8))
    engine = load_engine("llamacpp", None, heads=MedusaHeads(576, 4), max_batch=3, cost_model=cost)
    leaves, verify = [], engine.runner.verify
    engine.runner.verify = lambda items: (leaves.append(max(i.tree.n_leaves for i in items)), verify(items))[1]
    rng = random.Random(3)
    handles = [engine.submit(prompt_ids[i % 3], SamplingParams(max_tokens=rng.randrange(4, 16),
                                                               tree=rng.choice([None, "chain-2", "none", "mc_sim_7b_63"])))
               for i in range(8)]
    steps = 0
    while any(h.finished is None for h in handles):
        if rng.random() < 0.2:
            rng.choice(handles).cancel()
        engine.step()
        steps += 1
        live = {r.slot for r in engine.active if r.slot is not None} | set(engine.prefix.retained)
        _check_cells(engine.runner, live)
    reasons = {h.result().finish_reason for h in handles}
    assert "cancelled" in reasons and reasons <= {"cancelled", "length", "eos_token"}
    assert max(leaves) > 1  # multi-leaf trees (borrowed sequence ids) were verified
    engine.prefix.clear(engine)
    assert engine.runner.seq_ranges() == {}
    assert engine.runner.free_leaves == engine.runner.max_leaves


def test_context_full_is_an_error_not_a_crash():
    runner = LlamaCppRunner(embedded_gguf_path(), max_slots=2, n_ctx=256, hidden=False)
    slot = runner.alloc()
    with pytest.raises(ValueError, match="exceeds"):
        runner.prefill({slot: [500] * 300})
    other = runner.alloc()
    runner.prefill({slot: [500] * 200})
    with pytest.raises(RuntimeError, match="full"):
        runner.prefill({other: [600] * 100})
    assert runner.seq_ranges() == {slot: (0, 199)}  # the failed prompt left nothing behind
    runner.free(slot)
    runner.free(other)
    again = runner.alloc()
    logits, _ = runner.prefill({again: [7, 8, 9]})[again]
    assert logits.shape == (runner.vocab_size,) and torch.isfinite(logits).all()
