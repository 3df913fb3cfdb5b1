"""Device discipline: with the runner's outputs on a (simulated) CUDA device, the engine, the policy,
the acceptance rules and the heads only ever combine tensors and generators that live there.

The simulation (helpers/sim_device.py) enforces CUDA's rules on a CPU, so a CPU generator drawing from
CUDA logits, or a hidden state on the host fed to heads on the GPU, fails here as it would on a card.
"""

import pytest
import torch
from helpers import ToyTokenizer, random_heads, tiny_llama
from helpers.sim_device import CUDA, SimGenerator, SimulatedCuda, mark

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner

CHEAP = CostModel.from_function(lambda n: 0.01)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20] * 12, [3, 4]]


class SimCudaRunner:
    """A TorchRunner whose outputs, and lm_head, live on the simulated CUDA device (its own forward
    passes compute on the CPU). `stray_hidden` leaves the hidden states on the host: a runner bug."""

    device = CUDA

    def __init__(self, inner: TorchRunner, sim: SimulatedCuda, stray_hidden: bool = False):
        self.inner, self.sim, self.stray_hidden = inner, sim, stray_hidden
        sim.put(inner.lm_head)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _on_device(self, outputs):
        return {s: (mark(logits.clone()), hidden.clone() if self.stray_hidden else mark(hidden.clone()))
                for s, (logits, hidden) in outputs.items()}

    def prefill(self, chunks):
        with self.sim.paused():
            return self._on_device(self.inner.prefill(chunks))

    def verify(self, batch):
        with self.sim.paused():
            return self._on_device(self.inner.verify(batch))

    def commit(self, accepted):
        with self.sim.paused():
            self.inner.commit(accepted)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=5, vocab_size=64, hidden=32)


def run(model, speculation="mc_sim_7b_63", stray_hidden=False, **params):
    sim = SimulatedCuda()
    heads = sim.put(random_heads(model, seed=2, scale=0.3))
    runner = SimCudaRunner(TorchRunner(model, max_slots=4), sim, stray_hidden)
    engine = Engine(runner, ToyTokenizer(64), heads, speculation=speculation, cost_model=CHEAP)
    engine.eos_ids = set()
    with sim:
        handles = [engine.submit(p, SamplingParams(max_tokens=12, seed=i, **params)) for i, p in enumerate(PROMPTS)]
        for _ in range(200):
            if all(h.finished for h in handles):
                break
            engine.step()
    return [h.result() for h in handles], engine


@pytest.fixture
def sim_generators(monkeypatch):
    monkeypatch.setattr(torch, "Generator", SimGenerator)


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=8, top_p=0.9),
                                    dict(temperature=0.8, acceptance="typical"), dict()])
@pytest.mark.parametrize("speculation", ["mc_sim_7b_63", "off"])
def test_requests_are_served_when_the_logits_live_on_cuda(model, sim_generators, params, speculation):
    """The old engine made a CPU generator: every sampled request failed against CUDA logits."""
    results, engine = run(model, speculation, **params)
    assert [r.error for r in results] == [None] * len(PROMPTS)
    assert all(len(r.token_ids) == 12 for r in results)
    if params.get("temperature") and speculation != "off":
        for req in results:
            assert req.finish_reason == "length"
        assert engine.speculation.stats.proposed > 0  # the heads ran on the device too


def test_seeded_sampling_on_the_device_is_reproducible(model, sim_generators):
    first, _ = run(model, temperature=1.0)
    again, _ = run(model, temperature=1.0)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) > 1  # the seeds differ per request, so do the samples


def test_a_hidden_state_left_on_the_host_is_caught(model, sim_generators):
    """The simulation itself can fail: heads on the device refuse a host tensor, as CUDA does."""
    results, _ = run(model, stray_hidden=True)
    assert all(r.error is not None and "same device" in r.error for r in results)


def test_a_runner_whose_logits_stay_on_the_host_gets_a_host_generator(model, sim_generators):
    """llama.cpp returns logits to host memory while its hidden states (and heads) are on the GPU: the
    generator follows the logits, re-seeded before the first draw."""

    class HostLogits(SimCudaRunner):
        def _on_device(self, outputs):
            return {s: (logits.clone(), mark(hidden.clone())) for s, (logits, hidden) in outputs.items()}

    sim = SimulatedCuda()
    heads = sim.put(random_heads(model, seed=2, scale=0.3))
    engine = Engine(HostLogits(TorchRunner(model, max_slots=4), sim), ToyTokenizer(64), heads,
                    speculation="mc_sim_7b_63", cost_model=CHEAP)
    with sim:
        out = [engine.generate(PROMPTS[0], SamplingParams(max_tokens=8, seed=7, temperature=1.0)) for _ in range(2)]
    assert out[0].error is None and out[0].token_ids == out[1].token_ids


@pytest.mark.parametrize("params", [dict(temperature=0.9, top_k=8), dict()])
def test_the_whole_engine_on_the_device(sim_generators, params):
    """The torch runner itself on the simulated device too (prefill chunks, row packing, commits, the heads on
    its hidden states, sampling): the same tokens as on the CPU."""
    model = tiny_llama(seed=5, vocab_size=64, hidden=32)

    def serve(on_device: bool):
        sim = SimulatedCuda()
        runner = TorchRunner(model, max_slots=4)
        heads = random_heads(model, seed=2, scale=0.3)
        if on_device:
            runner.device = CUDA
            sim.put(model), sim.put(heads)
        engine = Engine(runner, ToyTokenizer(64), heads, speculation="mc_sim_7b_63", cost_model=CHEAP,
                        prefill_budget=8)
        engine.eos_ids = set()
        with sim:
            handles = [engine.submit(p, SamplingParams(max_tokens=10, seed=i, **params)) for i, p in enumerate(PROMPTS)]
            while not all(h.finished for h in handles):
                engine.step()
        return [h.result() for h in handles]

    on_cpu = serve(False)  # first: putting the model on the device marks its parameters for good
    on_device = serve(True)
    assert [r.error for r in on_device] == [None] * len(PROMPTS)
    assert [r.token_ids for r in on_device] == [r.token_ids for r in on_cpu]
