"""The continuous-batching Medusa engine on tiny random Llamas (fp32; the correctness tier also f16, bf16)."""

import asyncio

import pytest
import torch
from helpers import (
    FaultyRunner,
    OracleHeads,
    ToyTokenizer,
    assert_greedy_matches,
    dtype_noise,
    hf_greedy,
    random_heads,
    tiny_llama,
)

from nbkit.bench.static import StaticAdmission
from nbkit.engine.engine import Engine
from nbkit.engine.request import EngineStopped, Overloaded, SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner

CHEAP = CostModel.from_function(lambda n: 0.01)  # verification costs the same for any size: trees win
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20] * 30, [3, 4], list(range(40, 90)), [7]]


# The correctness tier also runs in the dtypes the GPUs serve (T4: float16; A100/L4: float16 or bfloat16).
DTYPES = pytest.mark.parametrize("model", [torch.float32, torch.float16, torch.bfloat16], indirect=True,
                                 ids=["f32", "f16", "bf16"])
# The tree grids below keep bfloat16 for `make test` (the quick tier runs float32 and float16 of each).
DTYPES_GRID = pytest.mark.parametrize(
    "model", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], indirect=True,
    ids=["f32", "f16", "bf16"])


@pytest.fixture(scope="module")
def model(request):
    return tiny_llama().to(getattr(request, "param", torch.float32))


@pytest.fixture(scope="module")
def refs(model):
    return [hf_greedy(model, p, 48) for p in PROMPTS]


@pytest.fixture(scope="module")
def noise(model, refs):
    """float16/bfloat16: near-ties of the plain greedy path may part (assert_greedy_matches); float32: 0."""
    return dtype_noise(model, [p + r for p, r in zip(PROMPTS, refs)])


def make_engine(model, heads=None, max_slots=8, static_batching=False, **kw):
    kw.setdefault("cost_model", CHEAP)
    if static_batching:
        kw["admission"] = StaticAdmission()
    return Engine(TorchRunner(model, max_slots=max_slots), ToyTokenizer(), heads, **kw)


@DTYPES
def test_plain_engine_equals_hf_generate(model, refs, noise):
    engine = make_engine(model)
    for p, ref in zip(PROMPTS, refs):
        out = engine.generate(p, SamplingParams(max_tokens=48))
        assert_greedy_matches(model, p, out.token_ids, ref, noise)
        assert out.steps == len(ref) - 1 and out.mean_accepted == 1.0  # first token comes from the prefill


@DTYPES_GRID
@pytest.mark.parametrize("speculation", ["mc_sim_7b_63", "vicuna_7b_stage2", "chain-3", "adaptive"])
def test_medusa_greedy_equals_plain_with_random_heads(model, refs, noise, speculation):
    engine = make_engine(model, random_heads(model), speculation=speculation)
    for p, ref in zip(PROMPTS, refs):
        assert_greedy_matches(model, p, engine.generate(p, SamplingParams(max_tokens=48)).token_ids, ref, noise)


@pytest.fixture(scope="module")
def oracle(model, refs):
    heads = OracleHeads(model)
    for p, ref in zip(PROMPTS, refs):
        heads.register(p, ref)
    return heads


@DTYPES_GRID
@pytest.mark.parametrize("speculation", ["mc_sim_7b_63", "chain-4", "adaptive"])
def test_medusa_greedy_equals_plain_when_heads_are_good(model, refs, oracle, noise, speculation):
    engine = make_engine(model, oracle, speculation=speculation)
    accepted = []
    for p, ref in zip(PROMPTS, refs):
        out = engine.generate(p, SamplingParams(max_tokens=48))
        assert_greedy_matches(model, p, out.token_ids, ref, noise)
        accepted.append(out.mean_accepted)
    # long paths really were accepted and compacted (a chain only holds rank 0, the oracle's rank varies)
    assert sum(accepted) / len(accepted) > (1.3 if speculation.startswith("chain") else 2.0)


@DTYPES
def test_eos_in_the_middle_of_an_accepted_path(model, refs, oracle):
    # Declare a token the greedy output produces at position ~12 to be EOS: Medusa accepts paths
    # that run past it and must still stop exactly at its first occurrence.
    ref = refs[0]
    eos = ref[12]
    first = ref.index(eos)
    tok = ToyTokenizer()
    tok.eos_token_id = eos
    engine = Engine(TorchRunner(model, max_slots=2), tok, oracle, speculation="mc_sim_7b_63", cost_model=CHEAP)
    out = engine.generate(PROMPTS[0], SamplingParams(max_tokens=48))
    assert out.finish_reason == "eos_token"
    assert out.token_ids == ref[: first + 1]
    hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=48, do_sample=False, eos_token_id=eos,
                        pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert out.token_ids == [t for t in hf if t != 0][: first + 1]


def run_until_done(engine, handles, max_steps=5000):
    for _ in range(max_steps):
        if all(h.finished for h in handles):
            return [h.result() for h in handles]
        engine.step()
    raise AssertionError("engine did not finish")


@DTYPES
def test_batch_equals_solo_with_staggered_arrivals_and_mixed_settings(model, refs, oracle, noise):
    engine = make_engine(model, oracle, max_slots=4, speculation="adaptive", prefill_budget=16)
    settings = [dict(max_tokens=48), dict(max_tokens=7, speculate=False), dict(max_tokens=48, tree="chain-2"),
                dict(max_tokens=30, tree="mc_sim_7b_63"), dict(max_tokens=48), dict(max_tokens=1)]
    handles = []
    for i, (p, s) in enumerate(zip(PROMPTS, settings)):
        handles.append(engine.submit(p, SamplingParams(**s)))
        for _ in range(i % 3):  # arrivals spread over steps; more requests than slots
            engine.step()
    results = run_until_done(engine, handles)
    for p, out, ref, s in zip(PROMPTS, results, refs, settings):
        assert_greedy_matches(model, p, out.token_ids, ref[: s["max_tokens"]], noise)
        assert out.finish_reason == "length"
    assert set(engine.runner.row_of) == set(engine.prefix.retained)  # every slot was freed or kept for reuse


def test_static_batching_baseline_pads_until_the_longest_request_is_done(model, refs):
    """The baseline: a finished row stays in the padded batch (computed, thrown away) until the batch
    ends, and queued work waits for that; outputs are still exact."""
    engine = make_engine(model, max_slots=3, static_batching=True)
    rows = []
    verify = engine.runner.verify
    engine.runner.verify = lambda inputs: rows.append(len(inputs)) or verify(inputs)
    lengths = [3, 20, 8, 5]
    handles = [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[:3], lengths)]
    late = engine.submit(PROMPTS[3], SamplingParams(max_tokens=lengths[3]))
    results = run_until_done(engine, handles + [late])
    for out, ref, n in zip(results, refs, lengths):
        assert out.token_ids == ref[:n]
    first_batch = rows[: lengths[1] - 1]
    assert first_batch == [3] * len(first_batch)  # the short requests' rows ran to the longest one's end
    assert rows[len(first_batch):] == [1] * (lengths[3] - 1)  # the late request ran alone, after the batch
    assert engine.runner.row_of == {} and engine.admission.rows == {}


def test_cancel_frees_the_slot_and_the_slot_is_reused_correctly(model, refs, oracle):
    engine = make_engine(model, oracle, max_slots=2, speculation="mc_sim_7b_63")
    a = engine.submit(PROMPTS[0], SamplingParams(max_tokens=48))
    b = engine.submit(PROMPTS[1], SamplingParams(max_tokens=48))
    for _ in range(4):
        engine.step()
    a.cancel()
    engine.step()
    assert a.finished.finish_reason == "cancelled" and len(engine.active) == 1
    c = engine.submit(PROMPTS[4], SamplingParams(max_tokens=48))  # takes a's slot, with a's stale KV in it
    out_b, out_c = run_until_done(engine, [b, c])
    assert out_b.token_ids == refs[1] and out_c.token_ids == refs[4]


def test_a_failing_request_does_not_disturb_the_others(model, refs, oracle):
    runner = FaultyRunner(TorchRunner(model, max_slots=4))
    engine = Engine(runner, ToyTokenizer(), oracle, speculation="mc_sim_7b_63", cost_model=CHEAP)
    handles = [engine.submit(p, SamplingParams(max_tokens=48)) for p in PROMPTS[:3]]
    bad = PROMPTS[1]
    calls = {"n": 0}

    def fault(slot):
        if slot.prompt_ids == bad:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected sampling failure")

    runner.fault = fault
    results = run_until_done(engine, handles)
    assert results[1].finish_reason == "error" and "injected" in results[1].error
    assert results[0].token_ids == refs[0] and results[2].token_ids == refs[2]


@DTYPES
def test_no_cross_talk_between_kv_rows(model, refs, noise):
    # The same prompt in every slot plus different ones: each row must only ever see its own KV.
    engine = make_engine(model, random_heads(model), max_slots=6, speculation="chain-2")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[4], PROMPTS[5], PROMPTS[0]]
    expect = [refs[0], refs[2], refs[0], refs[4], refs[5], refs[0]]
    results = run_until_done(engine, [engine.submit(p, SamplingParams(max_tokens=48)) for p in prompts])
    for p, r, ref in zip(prompts, results, expect):
        assert_greedy_matches(model, p, r.token_ids, ref, noise)
    same = [r.token_ids for p, r in zip(prompts, results) if p == PROMPTS[0]]
    assert same[0] == same[1] == same[2]  # the same prompt in three rows of one batch: the same tokens


def test_bounded_queue_says_overloaded(model):
    engine = make_engine(model, max_slots=1, max_queue=2)
    for _ in range(3):  # the free slot and the queue of two
        engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
    with pytest.raises(Overloaded):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
    assert engine.counters["rejected"] == 1


def test_no_queue_still_fills_free_slots(model):
    engine = make_engine(model, max_slots=2, max_queue=0)
    first, second = (engine.submit([1, 2, 3], SamplingParams(max_tokens=2)) for _ in range(2))
    with pytest.raises(Overloaded):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=2))
    run_until_done(engine, [first, second])


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                 dict(stop=[""]), dict(tree="nope"), dict(max_tokens=10**6)])
def test_bad_parameters_are_value_errors(model, bad):
    engine = make_engine(model, random_heads(model))
    with pytest.raises(ValueError):
        engine.submit([1, 2, 3], SamplingParams(**bad))
    with pytest.raises(ValueError):
        engine.submit([], SamplingParams())


def test_stop_strings_and_streamed_text(model, refs):
    engine = make_engine(model)
    full = ToyTokenizer().decode(refs[0])
    stop = full[10:13]
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=48, stop=[stop]))
    while handle.finished is None:
        engine.step()
    events = list(handle)
    final = events[-1]
    assert final.finish_reason == "stop_sequence"
    assert final.text == full[: full.index(stop)]
    assert "".join(e.text for e in events[:-1]) == final.text  # streamed deltas add up to the answer


def test_adaptive_policy_follows_the_cost_model(model, oracle):
    expensive = CostModel.from_function(lambda n: 1.0 * n)  # every verified token costs a full pass
    engine = make_engine(model, oracle, speculation="adaptive", cost_model=expensive)
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=20))
    assert set(engine.speculation.choices) == {"none"}
    engine = make_engine(model, oracle, speculation="adaptive", cost_model=CHEAP)
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=20))
    assert engine.speculation.last_choice.size > 8
    # a GPU-like curve (flat, then linear) with many rows picks a middle-sized tree
    gpu_like = CostModel.from_function(lambda n: 0.02 * max(1.0, n / 64))
    engine = make_engine(model, oracle, speculation="adaptive", cost_model=gpu_like)
    assert engine.speculation.policy.choose(n_rows=16, n_speculative=16).size < engine.speculation.policy.choose(1, 1).size


def test_heads_cost_is_priced_by_the_rows_that_run_them(model, oracle):
    """Heads measured at 1 and 16 rows: one request pays the 1-row price, not the 16-row one."""
    costs = CostModel({1: 0.010, 2: 0.0115, 4: 0.013, 64: 0.04}, heads_cost={1: 0.001, 16: 0.016}, ema=0.0)
    assert costs.heads(1) == 0.001 and abs(costs.heads(16) - 0.016) < 1e-9
    assert abs(costs.heads(8) - 0.008) < 1e-9 and costs.heads(32) > costs.heads(16)
    engine = make_engine(model, oracle, speculation="adaptive", cost_model=costs)
    assert engine.speculation.policy.choose(n_rows=1, n_speculative=1).size > 1  # a small tree pays at 1 row
    priced_at_16 = CostModel(costs.points, heads_cost=0.016, ema=0.0)
    engine = make_engine(model, oracle, speculation="adaptive", cost_model=priced_at_16)
    assert engine.speculation.policy.choose(n_rows=1, n_speculative=1).size == 1  # it would not at the 16-row price


def test_policy_wants_a_clear_gain_before_it_speculates():
    """A tree predicted 3% faster than no speculation is not worth the estimation error; 15% is."""
    from nbkit.engine.speculation import AcceptanceStats
    from nbkit.engine.speculation.policy import SpeculationPolicy
    from nbkit.medusa.trees import get_tree

    q = [[0.5] + [0.0] * 9] + [[0.0] * 10] * 3  # head 0's top-1 is right half the time, nothing else is
    stats = AcceptanceStats(4, measured=q)
    for two_tokens, speculates in ((0.0146, False), (0.0128, True)):  # 1.5 tokens for 1.46x / 1.28x the time
        costs = CostModel({1: 0.010, 2: two_tokens, 4: 0.05}, ema=0.0)
        policy = SpeculationPolicy(get_tree("mc_sim_7b_63", 4), stats, costs)
        assert (policy.choose(1, 1).size > 1) == speculates


def test_threaded_engine_streams_to_asyncio(model, refs, oracle):
    engine = make_engine(model, oracle, speculation="adaptive").start()
    try:
        async def run(p):
            tokens = []
            async for event in engine.submit(p, SamplingParams(max_tokens=48)):
                if hasattr(event, "token_id"):
                    tokens.append(event.token_id)
                else:
                    return tokens, event

        async def main():
            return await asyncio.gather(*(run(p) for p in PROMPTS))

        for (tokens, final), ref in zip(asyncio.run(main()), refs):
            assert tokens == ref == final.token_ids
    finally:
        engine.stop()


def test_dead_engine_fails_fast(model):
    engine = make_engine(model, max_slots=1)

    def boom():
        raise MemoryError("simulated crash")

    engine.step = boom
    engine.start()
    handle = engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
    out = handle.result(timeout=10)
    assert out.finish_reason == "error" and "simulated crash" in out.error
    with pytest.raises(EngineStopped):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
    assert not engine.alive


def test_cost_model_interpolates_between_measured_row_counts():
    costs = CostModel({1: 0.01, 32: 0.02}, ema=0.1)
    costs.measured.update({(1, 2): 0.012, (16, 2): 0.060})
    assert abs(costs.step(6, 2) - (0.012 + 0.048 * 5 / 15)) < 1e-9  # between 1 and 16 rows
    assert costs.step(16, 2) == 0.060
    assert abs(costs.step(20, 2) - costs(40)) < 1e-9  # outside the measured rows: the curve
    version = costs.version
    costs.observe(8, 0.05, n_rows=8)  # a first measurement of (8, 1) makes cached choices stale
    assert costs.version == version + 1
    costs.observe(8, 0.05, n_rows=8)
    assert costs.version == version + 1
