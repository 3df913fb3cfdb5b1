"""Structured output over Medusa trees (tiny model, one character per token): every node masked, forbidden
proposals pruned, greedy output equal with and without speculation and jump-forward, sampled output exactly
the constrained distribution (enumeration + chi-square), 400-worthy schemas refused by name."""

import itertools
import json
import re

import pytest
import torch
from helpers import ToyTokenizer, random_heads, tiny_llama
from test_sampling import pooled_chisquare

from nbkit.engine.engine import Engine
from nbkit.engine.request import GrammarKind, GrammarSpec, SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.acceptance import probs_from_logits
from nbkit.medusa.grammar import pruned_tree, tree_masks, unpack
from nbkit.medusa.trees import get_tree

VOCAB, PROMPT = 16, [3, 5, 7]
# ToyTokenizer: token i is the character chr(0x41 + i): 2 -> "C" ... 15 -> "P"; 1 is EOS
REGEX = GrammarSpec(GrammarKind.REGEX, "[C-H][D-L][C-P]")


def allowed_ids(pattern: str) -> list[int]:
    return [i for i in range(2, VOCAB) if re.fullmatch(pattern, chr(0x41 + i))]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, vocab_size=VOCAB, hidden=32, init=0.08)


def engine_for(model, speculation="mc_sim_7b_63", eos=True) -> Engine:
    heads = random_heads(model, seed=1, scale=0.3) if speculation != "off" else None
    engine = Engine(TorchRunner(model, max_slots=64), ToyTokenizer(VOCAB), heads, speculation=speculation,
                    max_queue=4000, cost_model=CostModel.from_function(lambda t: 0.01))
    if not eos:
        engine.eos_ids = set()
    return engine


def run(engine, n, **params):
    handles = [engine.submit(PROMPT, SamplingParams(seed=i, **params)) for i in range(n)]
    while not all(h.finished for h in handles):
        engine.step()
    return [tuple(h.result().token_ids) for h in handles]


def test_tree_masks_prune_what_the_grammar_forbids():
    engine = engine_for(tiny_llama(vocab_size=VOCAB, hidden=32))
    state = engine.grammar.start(REGEX)
    tree = get_tree("mc_sim_7b_63")
    tokens = [2] + [(3 * n) % VOCAB for n in range(1, tree.size)]  # the root "C" was emitted: feed it first
    assert state.matcher.accept_token(2)
    kept, masks = tree_masks(state.matcher, tree, tokens, VOCAB, frozenset({1}))
    ok1, ok2 = set(allowed_ids("[D-L]")), set(allowed_ids("[C-P]"))
    for n in range(1, tree.size):
        depth = len(tree.paths[n - 1])
        ancestors = [0] + [tree.paths.index(tree.paths[n - 1][:d]) + 1 for d in range(1, depth)] + [n]
        legal = depth <= 2 and tokens[ancestors[1]] in ok1 and (depth < 2 or tokens[n] in ok2)
        assert (n in kept) == legal, n
    assert kept[0] == 0 and len(kept) < tree.size  # some proposals were pruned, the root never is
    assert unpack(masks[:1], VOCAB)[0].nonzero().flatten().tolist() == sorted(ok1)
    small = pruned_tree(tree, kept)
    assert small.size == len(kept) and all(small.paths[i - 1] == tree.paths[kept[i] - 1] for i in range(1, len(kept)))
    assert state.matcher.accept_token(4)  # the walk rolled every token back: the matcher is where it was


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("spec", [REGEX, GrammarSpec(GrammarKind.REGEX, "(CDE|CDF|HIJK)+P")])
def test_greedy_constrained_is_the_same_with_speculation_and_jump_forward(model, spec, dtype):
    model = tiny_llama(seed=3, vocab_size=VOCAB, hidden=32, init=0.08).to(dtype)  # masks on half logits too
    plain = engine_for(model, "off")
    medusa = engine_for(model)
    ref = run(plain, 1, max_tokens=12, grammar=spec)[0]
    text = ToyTokenizer(VOCAB).decode(ref)
    assert re.fullmatch(spec.value, text), text  # complete: EOS came only where the grammar accepts
    for jump in (True, False):
        medusa.grammar.jump_forward = jump
        assert run(medusa, 1, max_tokens=12, grammar=spec)[0] == ref
    assert medusa.speculation.stats.accepted > 0  # trees were verified (and jump-forward chains accepted)


def constrained_distribution(model, pattern_per_position: list[str], temperature, top_k, top_p):
    """P(x1 x2 x3) by enumeration: each position's logits masked to its allowed tokens, then the target
    distribution (temperature/top-k/top-p), as plain constrained sampling draws it."""
    allowed = [allowed_ids(p) for p in pattern_per_position]
    probs = {}
    with torch.no_grad():
        for x1, x2 in itertools.product(*allowed[:2]):
            logits = model(torch.tensor([PROMPT + [x1, x2]])).logits[0, len(PROMPT) - 1:]
            p = []
            for i in range(3):
                masked = torch.full_like(logits[i], float("-inf"))
                masked[allowed[i]] = logits[i][allowed[i]]
                p.append(probs_from_logits(masked, temperature, top_p, top_k))
            for x3 in allowed[2]:
                probs[(x1, x2, x3)] = float(p[0][x1] * p[1][x2] * p[2][x3])
    return probs


@pytest.mark.slow  # thousands of samples
@pytest.mark.tiny
@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9)])
def test_constrained_medusa_sampling_is_exactly_the_constrained_distribution(model, params):
    exact = constrained_distribution(model, ["[C-H]", "[D-L]", "[C-P]"], params["temperature"],
                                     params.get("top_k", 0), params.get("top_p", 1.0))
    engine = engine_for(model, eos=False)
    n = 2000
    samples = run(engine, n, max_tokens=3, grammar=REGEX, **params)
    assert engine.speculation.stats.accepted > 0.3 * n  # pruned trees still accepted speculated tokens
    for margin in (1, 2, 3):
        assert pooled_chisquare(samples, exact, margin) > 1e-3
    # power: the unconstrained distribution renormalised is NOT what the grammar must give at position 1
    biased = run(engine, 600, max_tokens=3, grammar=REGEX, **{**params, "temperature": params["temperature"] * 0.5})
    assert pooled_chisquare(biased, exact, 2) < 1e-3


@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "allOf": [{"required": ["a"]}]}, "'allOf'"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "string", "format": "credit-card"}, "'credit-card'"),
    ({"$ref": "https://example.com/s.json"}, "https://example.com/s.json"),
])
def test_unsupported_schema_features_are_named(model, schema, problem):
    engine = engine_for(model, "off")
    with pytest.raises(ValueError, match=re.escape(problem)):
        engine.compile_grammar(GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema)))


@pytest.mark.parametrize("spec, problem", [
    (GrammarSpec(GrammarKind.JSON_SCHEMA, "{not json"), "not valid JSON"),
    (GrammarSpec(GrammarKind.REGEX, "[a-"), "invalid regex"),
])
def test_bad_schema_or_regex_is_a_value_error(model, spec, problem):
    with pytest.raises(ValueError, match=problem):
        engine_for(model, "off").compile_grammar(spec)


def test_compiled_grammars_are_cached(model):
    engine = engine_for(model, "off")
    spec = GrammarSpec(GrammarKind.JSON_OBJECT)
    engine.compile_grammar(spec)
    assert engine.grammar.compile(spec) is engine.grammar.compile(GrammarSpec(GrammarKind.JSON_OBJECT))
