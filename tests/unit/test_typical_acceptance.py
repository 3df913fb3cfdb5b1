"""Medusa's typical acceptance against the paper's rule, recomputed here without nbkit's sampling code.

Cai et al. 2024, section 2.3.1: a speculated token x is accepted when p(x) > min(epsilon, delta * exp(-H(p))),
p the target distribution at the node (softmax of logits / temperature), H its entropy. The Medusa repository's
defaults, which nbkit advertises: epsilon (posterior_threshold) 0.09, delta (posterior_alpha) 0.3.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import OracleHeads, ToyTokenizer, hf_greedy, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.acceptance import accept, accept_greedy
from nbkit.medusa.trees import build_tree

EPSILON, DELTA = 0.09, 0.3
TREE = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])  # 8 nodes, 3 deep
V = 6
# Target distributions (as probabilities at temperature 1) that put the threshold on both sides of epsilon:
# a peaked one (low entropy: epsilon binds), flat ones (high entropy: delta * exp(-H) binds), near-ties.
ROWS = [
    [0.78, 0.10, 0.06, 0.03, 0.02, 0.01],  # threshold epsilon = 0.09 (delta binds at 0.132): 0.10 in, 0.06 out
    [1 / 6] * 6,  # threshold 0.3 / 6 = 0.05: all in
    [0.35, 0.30, 0.20, 0.07, 0.05, 0.03],  # threshold delta * exp(-H) = 0.0675: 0.07 in, 0.05 out
    [0.95, 0.02, 0.01, 0.01, 0.005, 0.005],  # only the top token in
    [0.80, 0.085, 0.06, 0.03, 0.015, 0.01],  # threshold epsilon: 0.085 out
    [0.085, 0.095, 0.30, 0.30, 0.12, 0.10],  # near-ties, threshold 0.058
]
# Tree tokens (node -> token): siblings carry distinct tokens, as the candidate pool guarantees.
TOKENS = [[0, 0, 1, 2, 1, 3, 0, 5], [5, 2, 4, 0, 3, 2, 1, 0]]


def target(logits: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    e = [math.exp(x - top) for x in scaled]
    return [x / sum(e) for x in e]


def paper_threshold(p: list[float]) -> float:
    entropy = -sum(q * math.log(q) for q in p if q > 0)
    return min(EPSILON, DELTA * math.exp(-entropy))


def check_walk(tokens: list[int], logits: torch.Tensor, temperature: float, emitted: list[int],
               accepted: list[int]) -> None:
    """Replays the walk: where a child passes the paper's threshold the most likely passing child must be taken;
    where none passes the token is a sample (it may still land on a child carrying it, whose KV is then valid)."""
    assert accepted[0] == 0 and len(accepted) == len(emitted)
    node = 0
    for i, x in enumerate(emitted):
        p = target(logits[node].tolist(), temperature)
        threshold = paper_threshold(p)
        passing = [c for c in TREE.children[node].values() if p[tokens[c]] > threshold]
        carrying = [c for c in TREE.children[node].values() if tokens[c] == x]
        if passing:
            best = max(p[tokens[c]] for c in passing)
            assert x in {tokens[c] for c in passing if p[tokens[c]] == best}, (i, x, p, threshold)
        else:
            assert p[x] > 0
        if not carrying:
            assert i == len(emitted) - 1, "the walk went on past a token no child carries"
            return
        node = carrying[0]
        assert accepted[i + 1] == node
    pytest.fail("the walk ended on a node that has a child carrying the last token")


def test_typical_acceptance_follows_the_papers_threshold_on_enumerated_cases():
    cases = 0
    generator = torch.Generator().manual_seed(0)
    for temperature, tokens in itertools.product((0.5, 1.0, 1.7), TOKENS):
        for root, depth1, deeper in itertools.product(range(len(ROWS)), repeat=3):
            rows = [ROWS[root]] + [ROWS[depth1]] * 3 + [ROWS[deeper]] * 4
            logits = torch.tensor([[math.log(q) * temperature for q in row] for row in rows])  # p at this T = row
            params = SamplingParams(temperature=temperature, acceptance="typical")
            emitted, accepted = accept(TREE, tokens, logits, params, generator)
            check_walk(tokens, logits, temperature, emitted, accepted)
            cases += 1
    assert cases == 3 * 2 * len(ROWS) ** 3


def acceptance_rate(row: list[float], token: int, temperature: float, n: int = 200) -> float:
    """How often a one-child tree whose child carries `token` keeps it, the target at the root being `row`."""
    tree = build_tree([[0]])
    logits = torch.tensor([[math.log(q) * temperature for q in row]] * 2)
    params = SamplingParams(temperature=temperature, acceptance="typical")
    kept = sum(accept(tree, [0, token], logits, params, torch.Generator().manual_seed(seed))[1] == [0, 1]
               for seed in range(n))
    return kept / n


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_threshold_hand_computed_on_both_sides_of_epsilon_and_delta(temperature):
    """A child above the threshold is always kept; one below it only when the sample happens to be its token
    (at its own probability, 5-9% here)."""
    assert paper_threshold([0.7, 0.2, 0.1]) == EPSILON  # H = 0.8018, delta * exp(-H) = 0.1346
    assert paper_threshold([1 / 6] * 6) == pytest.approx(0.05)  # H = ln 6: delta binds
    assert paper_threshold(ROWS[2]) == pytest.approx(0.3 * math.exp(-1.4905), abs=1e-4)  # 0.0675
    assert acceptance_rate(ROWS[0], 1, temperature) == 1.0  # 0.10 > epsilon
    assert acceptance_rate(ROWS[4], 1, temperature) < 0.2  # 0.085 < epsilon
    assert acceptance_rate(ROWS[2], 3, temperature) == 1.0  # 0.07 > 0.0675
    assert acceptance_rate(ROWS[2], 4, temperature) < 0.15  # 0.05 < 0.0675, although far below epsilon


def random_case(seed: int) -> tuple[list[int], torch.Tensor]:
    """Random logits and tree tokens drawn like Medusa's: each node's children carry its top tokens, often
    the argmax, so greedy walks go deep."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(TREE.size, 16, generator=g) * 3
    tokens = [0] * TREE.size
    for node in range(TREE.size):
        ranked = logits[node].argsort(descending=True).tolist()
        shift = int(torch.randint(0, 2, (1,), generator=g))
        for rank, child in TREE.children[node].items():
            tokens[child] = ranked[rank + shift]
    return tokens, logits


def test_the_greedy_limit_of_typical_acceptance_is_greedy():
    deep = 0
    for seed in range(500):
        tokens, logits = random_case(seed)
        typical = accept(TREE, tokens, logits, SamplingParams(temperature=0.0, acceptance="typical"))
        assert typical == accept_greedy(TREE, tokens, logits), seed
        deep += len(typical[1]) > 2
    assert deep > 50  # the cases did accept speculated tokens


@pytest.mark.tiny
def test_engine_with_typical_acceptance_at_temperature_zero_decodes_greedy():
    model = tiny_llama()
    prompt = [5, 6, 7, 8]
    ref = hf_greedy(model, prompt, 48)
    heads = OracleHeads(model)
    heads.register(prompt, ref)
    engine = Engine(TorchRunner(model, max_slots=1), ToyTokenizer(), heads, speculation="mc_sim_7b_63",
                    cost_model=CostModel.from_function(lambda n: 0.01))
    out = engine.generate(prompt, SamplingParams(max_tokens=48, acceptance="typical"))
    assert out.token_ids == ref
    assert out.mean_accepted > 1.5  # the trees were verified and accepted, not skipped

