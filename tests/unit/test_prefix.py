"""Prefix reuse (engine/prefix.py) on the torch runner: the output with reuse equals the output without."""

import pytest
import torch
from helpers import ToyTokenizer, random_heads, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.prefix import common_prefix
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner

CHEAP = CostModel.from_function(lambda n: 0.01)
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def engine(model, prefix_cache=True, max_slots=4, heads=None, **kw):
    return Engine(TorchRunner(model, max_slots=max_slots), ToyTokenizer(), heads, cost_model=CHEAP,
                  prefix_cache=prefix_cache, **kw)


def run_together(e: Engine, prompts: list[list[int]], params=GREEDY):
    handles = [e.submit(p, params) for p in prompts]
    while any(h.finished is None for h in handles):
        e.step()
    return [h.result() for h in handles]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7, 8], [7, 8]) == 2 and common_prefix([1], [2]) == 0


def test_second_turn_reuses_the_first_turns_kv(model):
    on, off = engine(model), engine(model, prefix_cache=False)
    p1 = list(range(30, 70))
    t1 = on.generate(p1, GREEDY)
    assert t1.cached_tokens == 0
    p2 = p1 + t1.token_ids + [9, 10, 11]
    t2 = on.generate(p2, GREEDY)
    # The first turn's last token was emitted but never decoded: its KV holds all the others.
    assert t2.cached_tokens == len(p1) + len(t1.token_ids) - 1
    assert t2.token_ids == off.generate(p2, GREEDY).token_ids
    assert on.counters["prefill_tokens"] == len(p1) + len(p2) - t2.cached_tokens
    s = on.snapshot()
    assert s["prefix_hits"] == 1 and s["prefix_cached_tokens"] == t2.cached_tokens
    assert s["prefix_hit_rate"] == pytest.approx(t2.cached_tokens / (len(p1) + len(p2)))
    assert off.snapshot()["prefix_hits"] == 0 and not off.prefix.retained


def test_a_repeated_prompt_prefills_only_its_last_token(model):
    on = engine(model)
    p = list(range(100, 140))
    first, again = on.generate(p, GREEDY), on.generate(p, GREEDY)
    assert again.cached_tokens == len(p) - 1 and again.token_ids == first.token_ids


def test_least_recently_used_slot_is_evicted_when_slots_run_out(model):
    on, off = engine(model, max_slots=2), engine(model, prefix_cache=False, max_slots=2)
    a, b, c = [list(range(s, s + 20)) for s in (10, 40, 70)]
    outs = {k: on.generate(p, GREEDY) for k, p in zip("abc", (a, b, c))}  # c takes a's slot
    assert on.prefix.evictions == 1 and len(on.prefix.retained) == 2
    b2, a2 = b + outs["b"].token_ids + [5], a + outs["a"].token_ids + [5]
    rb, ra = on.generate(b2, GREEDY), on.generate(a2, GREEDY)
    assert rb.cached_tokens == len(b) + 15 and ra.cached_tokens == 0  # a's KV was evicted
    assert on.prefix.evictions == 2  # a2 needed a slot: c's (least recently used) went
    assert rb.token_ids == off.generate(b2, GREEDY).token_ids and ra.token_ids == off.generate(a2, GREEDY).token_ids


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "medusa"])
def test_shared_prefixes_in_one_batch_equal_the_requests_alone(model, speculate):
    """A system prompt shared by three requests and one prompt sent three times (n choices), all at once."""
    heads = random_heads(model) if speculate else None
    on, off = engine(model, heads=heads, max_slots=8), engine(model, prefix_cache=False, max_slots=8, heads=heads)
    system = list(range(50, 90))
    prompts = [system + [3, 4], system + [5], system + [6, 7, 8]] + [list(range(120, 150))] * 3
    alone = [off.generate(p, GREEDY).token_ids for p in prompts]
    outs = run_together(on, prompts)
    assert [o.token_ids for o in outs] == alone
    # The system prompt is prefilled once and copied to the others; the repeated prompt likewise.
    assert [o.cached_tokens for o in outs] == [0, 40, 40, 0, 29, 29]
    assert on.counters["prefill_tokens"] == sum(map(len, prompts)) - 40 * 2 - 29 * 2


def test_reuse_in_bfloat16_stays_on_the_greedy_path(model):
    """bfloat16 (a GPU's dtype, on the CPU): reused KV was computed in other batches; the text must still be the
    same as without reuse on a model whose logits are spread (tiny_llama)."""
    m = tiny_llama().to(torch.bfloat16)
    on, off = engine(m), engine(m, prefix_cache=False)
    p1 = list(range(60, 100))
    t1 = on.generate(p1, GREEDY)
    p2 = p1 + t1.token_ids + [12, 13]
    t2 = on.generate(p2, GREEDY)
    assert t2.cached_tokens > 0 and t2.token_ids == off.generate(p2, GREEDY).token_ids


def test_cancelled_and_failed_requests_are_not_kept(model):
    on = engine(model)
    h = on.submit(list(range(20, 40)), GREEDY)
    on.step()
    h.cancel()
    on.step()
    assert h.result().finish_reason == "cancelled" and not on.prefix.retained
    assert on.runner.row_of == {}


def test_seeded_choices_are_reproducible_with_reuse(model):
    on = engine(model)
    p = list(range(70, 100))
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    handles = [on.submit(p, sp) for sp in params]
    while any(h.finished is None for h in handles):
        on.step()
    a, b, c = (h.result().token_ids for h in handles)
    assert a == c and a != b
    assert a == engine(model, prefix_cache=False).generate(p, params[0]).token_ids


@pytest.mark.parametrize("argv, expected", [((), True), (("--no-prefix-cache",), False)])
def test_serve_passes_the_prefix_cache_switch_to_the_engine(monkeypatch, argv, expected):
    import argparse

    import nbkit.server.launch as launch
    from nbkit.server.cli import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    seen = {}

    def fake_start(**kw):  # stands for the model load: what the engine would be built with
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "start_server", fake_start)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    monkeypatch.setattr("nbkit.server.request_log.show_logs", lambda *a, **k: None)  # no global log handlers
    assert args.func(args) == 130 and seen["prefix_cache"] is expected
