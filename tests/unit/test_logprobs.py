"""Log-probabilities of the emitted tokens (nbkit/engine/logprobs.py): the target model's distribution at each
token's position, after the request's temperature/top-k/top-p, the same with and without speculation.

The reference is a plain Hugging Face forward pass over prompt + output: its logits at position i, processed as
the sampler processes them, must give what the engine reported for output token i, whatever tree verified it.
"""

import pytest
import torch
from helpers import OracleHeads, ToyTokenizer, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.logprobs import processed_logprobs, token_logprobs
from nbkit.engine.request import SamplingParams, TokenEvent
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.acceptance import probs_from_logits

CHEAP = CostModel.from_function(lambda n: 0.01)
PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 70))]
N = 24
# Two computation paths of one logit differ by the dtype's rounding; a log-probability by about twice that.
ATOL = {torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.25}


@pytest.fixture(scope="module", params=[torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def model(request):
    return tiny_llama().to(request.param)


@pytest.fixture(scope="module")
def engine(model):
    """Heads that know each prompt's greedy continuation (the engine's own plain output): long accepted paths."""
    heads = OracleHeads(model)
    engine = Engine(TorchRunner(model, max_slots=4), ToyTokenizer(), heads, cost_model=CHEAP)
    for p in PROMPTS:
        heads.register(p, engine.generate(p, SamplingParams(max_tokens=N, ignore_eos=True, tree="none")).token_ids)
    return engine


@torch.inference_mode()
def reference(model, prompt: list[int], output: list[int], params: SamplingParams) -> torch.Tensor:
    """Processed log-probabilities [len(output), V] from one plain forward pass (float32 logits)."""
    logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : len(prompt) + len(output) - 1]
    return processed_logprobs(logits.float(), params.temperature, params.top_p, params.top_k)


def run(engine, prompt, **kw):
    """(Finished, the streamed TokenEvents) of one request driven by the caller's thread."""
    engine.prepare()
    handle = engine.submit(prompt, SamplingParams(logprobs=True, ignore_eos=True, **kw))
    while handle.finished is None:
        engine.step()
    events = list(handle)
    return events[-1], [e for e in events if isinstance(e, TokenEvent)]


# Sampled: temperature only. A top-k or top-p cut depends on near-ties that two float16 paths may order either
# way; the cut itself is checked below and in test_processed_logprobs_are_the_samplers_distribution.
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 7}], ids=["greedy", "sampled"])
def test_logprobs_are_the_targets_with_and_without_speculation(model, engine, sampling):
    atol = ATOL[model.dtype]
    for prompt in PROMPTS:
        plain, plain_events = run(engine, prompt, max_tokens=N, top_logprobs=5, tree="none", **sampling)
        spec, _ = run(engine, prompt, max_tokens=N, top_logprobs=5, tree="mc_sim_7b_63", **sampling)
        assert plain.steps == N - 1 and (spec.steps < N - 1 or sampling)  # greedy: rows came from trees
        assert [e.logprobs for e in plain_events] == plain.logprobs  # streamed = aggregated
        same = next((i for i, (a, b) in enumerate(zip(plain.token_ids, spec.token_ids)) if a != b), N)
        assert same == N or model.dtype != torch.float32  # only rounding may part two paths
        for fin in (plain, spec):
            assert len(fin.logprobs) == fin.completion_tokens == N
            assert [e.token_id for e in fin.logprobs] == fin.token_ids
            ref = reference(model, prompt, fin.token_ids, SamplingParams(**sampling))
            got = torch.tensor([e.logprob for e in fin.logprobs])
            want = ref.gather(1, torch.tensor(fin.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
            for e, row in zip(fin.logprobs, ref):
                assert len(e.top) == 5
                ids, values = zip(*e.top)
                assert list(values) == sorted(values, reverse=True)
                torch.testing.assert_close(torch.tensor(values), row[list(ids)], atol=atol, rtol=0)
        for a, b in zip(plain.logprobs[:same], spec.logprobs[:same]):
            assert abs(a.logprob - b.logprob) <= atol
            torch.testing.assert_close(torch.tensor([v for _, v in a.top]), torch.tensor([v for _, v in b.top]),
                                       atol=atol, rtol=0)


def test_greedy_token_is_the_most_likely_and_sampled_ones_are_in_the_support(model, engine):
    greedy, _ = run(engine, PROMPTS[0], max_tokens=N, top_logprobs=5)
    assert all(e.top[0][0] == e.token_id and e.top[0][1] == e.logprob for e in greedy.logprobs)
    sampled, _ = run(engine, PROMPTS[0], max_tokens=N, top_logprobs=8, temperature=1.0, top_k=3, seed=1)
    for e in sampled.logprobs:
        kth = e.top[2][1]  # top-k keeps every token at least as likely as the 3rd (ties included)
        assert kth > float("-inf") and e.logprob >= kth and (e.token_id, e.logprob) in e.top
        assert all(v == float("-inf") for _, v in e.top if v < kth)  # cut: the sampler never picks them
        assert sum(v == float("-inf") for _, v in e.top) >= 4


def test_a_request_that_stops_inside_an_accepted_path_reports_only_its_tokens(model, engine):
    ref = engine.generate(PROMPTS[0], SamplingParams(max_tokens=N, ignore_eos=True)).token_ids
    fin, events = run(engine, PROMPTS[0], max_tokens=N, stop=[ToyTokenizer().decode(ref[9:11])],
                      tree="mc_sim_7b_63")
    assert fin.finish_reason == "stop_sequence" and len(fin.logprobs) == fin.completion_tokens == len(events)
    quiet = engine.generate(PROMPTS[0], SamplingParams(max_tokens=4))
    assert quiet.logprobs == []  # not asked: none computed


def test_processed_logprobs_are_the_samplers_distribution():
    torch.manual_seed(0)
    rows = torch.randn(6, 50) * 3
    assert torch.equal(processed_logprobs(rows, 0.0), torch.log_softmax(rows, -1))
    for temperature, top_p, top_k in [(0.7, 1.0, 0), (1.0, 0.8, 0), (1.3, 0.5, 10), (0.5, 1e-30, 0), (1.0, 1.0, 3)]:
        probs = probs_from_logits(rows, temperature, top_p, top_k)
        logp = processed_logprobs(rows, temperature, top_p, top_k)
        assert torch.equal(probs > 0, logp > float("-inf"))  # the same support, cut by the same rule
        torch.testing.assert_close(logp.exp(), probs, atol=1e-6, rtol=1e-5)
    tiny = processed_logprobs(rows, 1e-300)  # the sampler's temperature floor (1e-5): finite, not NaN
    assert not tiny.isnan().any() and torch.equal(tiny.argmax(-1), rows.argmax(-1))
    torch.testing.assert_close(tiny.exp(), probs_from_logits(rows, 1e-300), atol=1e-6, rtol=1e-5)


def test_not_asked_computes_nothing_and_limits_are_checked():
    assert token_logprobs(None, [0], [5], SamplingParams()) == []  # the logits are not even looked at
    for bad in (-1, 21, 2.5):
        with pytest.raises(ValueError, match="top_logprobs"):
            SamplingParams(logprobs=True, top_logprobs=bad).validate()
