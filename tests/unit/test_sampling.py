"""Lossless Medusa sampling: the output distribution equals plain sampling (exact enumeration + chi-square)."""

import itertools
import math

import pytest
import torch
from helpers import ToyTokenizer, random_heads, tiny_llama
from scipy.stats import chisquare

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.acceptance import probs_from_logits

VOCAB, PROMPT, N = 16, [3, 5, 7], 2500


# The sampling tier also runs in the dtypes the GPUs serve: the exact distribution is enumerated with the same
# float16/bfloat16 model, so a lossless engine matches it up to rounding, far below what 2500 samples resolve.
DTYPES = pytest.mark.parametrize("model", [torch.float32, torch.float16, torch.bfloat16], indirect=True,
                                 ids=["f32", "f16", "bf16"])


@pytest.fixture(scope="module")
def model(request):
    # A flat-ish distribution over 16 tokens: random heads' top-10 then cover most of it, so the
    # walk goes deep and every branch of the acceptance rule is exercised.
    return tiny_llama(seed=3, vocab_size=VOCAB, hidden=32, init=0.08).to(getattr(request, "param", torch.float32))


def exact_distribution(model, temperature, top_k, top_p, n_tokens=3):
    """P(x1..xn) by enumeration with the same target-distribution code as the engine."""
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB), repeat=n_tokens - 1):
            logits = model(torch.tensor([PROMPT + list(seq)])).logits[0, len(PROMPT) - 1:]
            p = [probs_from_logits(logits[i], temperature, top_p, top_k) for i in range(n_tokens)]
            prefix = 1.0
            for i, x in enumerate(seq):
                prefix *= float(p[i][x])
            for x in range(VOCAB):
                probs[seq + (x,)] = probs.get(seq + (x,), 0.0) + prefix * float(p[-1][x]) / 1.0
    # every full sequence appears VOCAB^0 times above; normalise defensively
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()}


def sample(model, speculation, n, **params):
    heads = random_heads(model, seed=1, scale=0.3) if speculation != "off" else None
    engine = Engine(TorchRunner(model, max_slots=64), ToyTokenizer(VOCAB), heads, speculation=speculation,
                    max_queue=n, cost_model=CostModel.from_function(lambda t: 0.01))
    engine.eos_ids = set()  # no early stop: every sample has 3 tokens
    handles = [engine.submit(PROMPT, SamplingParams(max_tokens=3, seed=i, **params)) for i in range(n)]
    while not all(h.finished for h in handles):
        engine.step()
    return [tuple(h.result().token_ids) for h in handles], engine


def pooled_chisquare(samples, exact, margin):
    """Chi-square on the marginal over the first `margin` tokens, pooling cells with < 5 expected."""
    observed, expected = {}, {}
    for seq, p in exact.items():
        expected[seq[:margin]] = expected.get(seq[:margin], 0.0) + p * len(samples)
    for s in samples:
        observed[s[:margin]] = observed.get(s[:margin], 0) + 1
    assert set(observed) <= {k for k, e in expected.items() if e > 0}, "sampled an impossible sequence"
    big = [k for k, e in expected.items() if e >= 5]
    obs = [observed.get(k, 0) for k in big]
    exp = [expected[k] for k in big]
    rest_exp = len(samples) - sum(exp)
    if rest_exp >= 1:  # pool the rare cells into one
        obs.append(len(samples) - sum(obs))
        exp.append(rest_exp)
    exp = [e * sum(obs) / sum(exp) for e in exp]  # exact totals despite float rounding
    return chisquare(obs, exp).pvalue


@DTYPES
@pytest.mark.slow  # many samples or an epoch of training: out of `make test-fast`
@pytest.mark.tiny
@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9)])
def test_medusa_sampling_is_lossless(model, params):
    exact = exact_distribution(model, params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0))
    medusa, engine = sample(model, "mc_sim_7b_63", N, **params)
    # the trees did accept speculated tokens, so the rule was really exercised
    assert engine.speculation.stats.accepted > 0.3 * N
    for margin in (1, 2, 3):
        assert pooled_chisquare(medusa, exact, margin) > 1e-3
    # and the test has power: a biased sampler (greedy-ish temperature) is rejected
    biased, _ = sample(model, "mc_sim_7b_63", 800, **{**params, "temperature": params["temperature"] * 0.6})
    assert pooled_chisquare(biased, exact, 2) < 1e-3


@DTYPES
@pytest.mark.slow  # many samples or an epoch of training: out of `make test-fast`
@pytest.mark.tiny
def test_plain_sampling_matches_the_same_distribution(model):
    exact = exact_distribution(model, 1.0, 0, 1.0)
    plain, _ = sample(model, "off", N, temperature=1.0)
    assert pooled_chisquare(plain, exact, 3) > 1e-3


@DTYPES
def test_seed_makes_sampling_reproducible(model):
    a, _ = sample(model, "mc_sim_7b_63", 20, temperature=1.0)
    b, _ = sample(model, "mc_sim_7b_63", 20, temperature=1.0)
    assert a == b and len(set(a)) > 5


# ---- the target distribution against independent references -------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.7])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.6), (3, 0.95), (1, 0.5)])
def test_target_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    """transformers' own order: temperature, then top-k, then top-p, then softmax (random logits: no ties, no
    cumulative mass exactly at top_p)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))) * 2.5
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = torch.softmax(scores, dim=-1)
    got = torch.stack([probs_from_logits(row, temperature, top_p, top_k) for row in logits])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    kept = (want > 0).sum(-1)
    assert (kept < 40).all() if (top_k or top_p < 1.0) else (kept == 40).all()  # the filters did filter


def test_target_distribution_hand_computed_at_temperature_one_half():
    """logits (2, 1, 0, -1) / 0.5 = (4, 2, 0, -2): softmax (0.8650, 0.1171, 0.0158, 0.0021). top_p 0.9 keeps
    the first two (0.865 < 0.9 before the second; 0.982 >= 0.9 before the third): 1 / (1 + e^-2) = 0.8808."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    e = [math.exp(4), math.exp(2), 1.0, math.exp(-2)]
    plain = torch.tensor([x / sum(e) for x in e])
    torch.testing.assert_close(probs_from_logits(logits, 0.5), plain)
    nucleus = torch.tensor([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.0, 0.0])
    torch.testing.assert_close(probs_from_logits(logits, 0.5, top_p=0.9), nucleus)
    torch.testing.assert_close(probs_from_logits(logits, 0.5, top_k=2), nucleus)
    torch.testing.assert_close(probs_from_logits(logits, 0.5, top_p=0.99, top_k=2), nucleus)
    e17 = [math.exp(2 / 1.7), math.exp(1 / 1.7), 1.0]
    torch.testing.assert_close(probs_from_logits(logits, 1.7, top_k=3),
                               torch.tensor([x / sum(e17) for x in e17] + [0.0]))  # T = 1.7, top 3 of 4
