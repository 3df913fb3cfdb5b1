"""The torch runner on a (simulated) CUDA device: everything it combines lives there, and a step reads
nothing back to the host and uploads its host data in one copy (each read or upload waits for the GPU)."""

import random

import pytest
import torch
from helpers import tiny_llama
from helpers.sim_device import CUDA, SimulatedCuda, on_device

from nbkit.engine.runner import TreeInput
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.trees import get_tree

BATCH = 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1, vocab_size=64, hidden=32)


def step_at_batch_16(runner, sim=None):
    """Prefill 16 ragged prompts, verify mc_sim_7b_63 on all of them, commit mixed paths; per-phase
    (reads, uploads) when `sim` counts them, and the verify outputs."""
    rng, counts = random.Random(0), {}
    tree = get_tree("mc_sim_7b_63", 4)
    slots = [runner.alloc() for _ in range(BATCH)]

    def phase(name, fn):
        if sim is not None:
            sim.reads = sim.uploads = 0
        out = fn()
        if sim is not None:
            counts[name] = (sim.reads, sim.uploads)
        return out

    phase("prefill", lambda: runner.prefill({s: [rng.randrange(2, 64) for _ in range(3 + i)]
                                             for i, s in enumerate(slots)}))
    batch = [TreeInput(s, tree, [rng.randrange(2, 64) for _ in range(tree.size)]) for s in slots]
    out = phase("verify", lambda: runner.verify(batch))
    phase("commit", lambda: runner.commit({s: [0, 3, 9] if i % 2 else [0] for i, s in enumerate(slots)}))
    out2 = phase("verify again", lambda: runner.verify(batch))
    return counts, out, out2


def test_a_verify_step_at_batch_16_syncs_a_constant_few_times(model):
    """The old runner read the longest length back (1 read) and copied each row's tokens, depths and tree
    mask separately (48 uploads) per verify step at batch 16; its prefill read 2 values back."""
    sim = SimulatedCuda()
    runner = TorchRunner(model, max_slots=BATCH)
    runner.device = CUDA
    sim.put(model)
    with sim:
        counts, out, out2 = step_at_batch_16(runner, sim)
    assert counts["prefill"][0] == 0 and counts["prefill"][1] <= 1
    assert counts["verify"] == (0, 2)  # the step's host data, and the tree's tensors the first time it is seen
    assert counts["commit"] == (0, 1)
    assert counts["verify again"] == (0, 1)  # the tree's tensors are cached on the device
    for logits, hidden in list(out.values()) + list(out2.values()):
        assert on_device(logits) and on_device(hidden)

    plain = TorchRunner(model, max_slots=BATCH)  # the same step on the CPU: the same numbers
    _, ref, ref2 = step_at_batch_16(plain)
    for got, want in ((out, ref), (out2, ref2)):
        for slot in want:
            torch.testing.assert_close(got[slot][0], want[slot][0])
