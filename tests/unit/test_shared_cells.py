"""A runner whose slots share one KV cache and one forward pass's budgets (llama.cpp's): the engine admits only
what the cells hold, and cuts every step's trees to the free sequence ids and the batch's token capacity.

The runner here is the torch runner dressed with llama.cpp's budgets (kv_cells, kv_parked, n_batch,
max_leaves), so the engine's side is checked without the bindings; greedy output must still equal plain
greedy decoding (cutting a tree is lossless).
"""

import pytest
from helpers import FaultyRunner, ToyTokenizer, hf_greedy, random_heads, tiny_llama

from nbkit.engine.budget import fit_trees, ladder
from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.trees import chain, get_tree

PROMPTS = [[5 + i, 17, 42 + i, 9, 33, 71 + 2 * i, 12, 8] * 3 for i in range(4)]
N_NEW = 20


class SharedCells(FaultyRunner):
    """The torch runner with llama.cpp's shared budgets; records every step's rows and the cells held."""

    def __init__(self, runner, kv_cells=None, n_batch=None, max_leaves=None, parked=0):
        super().__init__(runner)
        self.kv_cells, self.n_batch, self.max_leaves, self.kv_parked = kv_cells, n_batch, max_leaves, parked
        self.recomputes_accepted = False
        self.steps: list[list] = []
        self.live_max = 0

    def alloc(self) -> int:
        slot = super().alloc()
        self.live_max = max(self.live_max, self.inner.max_slots - len(self.inner._free_slots))
        return slot

    def verify(self, batch):
        self.steps.append([item.tree for item in batch])
        return super().verify(batch)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def refs(model):
    return [hf_greedy(model, p, N_NEW) for p in PROMPTS]


def _engine(model, runner, speculation="mc_sim_7b_63"):
    return Engine(runner, ToyTokenizer(), random_heads(model), speculation=speculation,
                  cost_model=CostModel.from_function(lambda n: 0.01))


def _run(engine, prompts, params):
    handles = [engine.submit(p, params) for p in prompts]
    while any(h.finished is None for h in handles):
        engine.step()
    return [h.result().token_ids for h in handles]


def test_a_fixed_tree_is_cut_to_the_free_sequence_ids_and_the_batch(model, refs):
    # The old engine sent 4 x mc_sim_7b_63 (4 x 42 leaves, 4 x 64 tokens) whatever the runner could take:
    # llama.cpp refused the step ("the trees need 168 sequence ids") and every request failed.
    runner = SharedCells(TorchRunner(model, max_slots=4), n_batch=150, max_leaves=50)
    out = _run(_engine(model, runner), PROMPTS, SamplingParams(max_tokens=N_NEW, ignore_eos=True))
    assert out == refs
    assert any(max(t.size for t in trees) > 1 for trees in runner.steps)  # trees did run
    for trees in runner.steps:
        assert sum(t.size for t in trees) <= 150
        assert sum(t.n_leaves for t in trees if t.n_leaves > 1) <= 50


def test_a_requests_own_tree_is_cut_too(model, refs):
    runner = SharedCells(TorchRunner(model, max_slots=4), n_batch=70, max_leaves=10)
    out = _run(_engine(model, runner, speculation="adaptive"), PROMPTS,
               SamplingParams(max_tokens=N_NEW, ignore_eos=True, tree="mc_sim_7b_63"))
    assert out == refs
    for trees in runner.steps:
        assert sum(t.size for t in trees) <= 70
        assert sum(t.n_leaves for t in trees if t.n_leaves > 1) <= 10


def test_admission_waits_for_shared_cells_fifo(model, refs):
    # Each request reserves 24 prompt + 20 new + 65 (the largest tree's room) = 109 cells; 250 cells hold two.
    # The old engine admitted all four at once, and llama.cpp's "context is full" failed the batch.
    runner = SharedCells(TorchRunner(model, max_slots=4), kv_cells=250, parked=10)
    engine = _engine(model, runner)
    out = _run(engine, PROMPTS, SamplingParams(max_tokens=N_NEW, ignore_eos=True))
    assert out == refs
    assert runner.live_max == 2


def test_parked_cells_count_against_admission(model):
    runner = SharedCells(TorchRunner(model, max_slots=4), kv_cells=250, parked=150)
    engine = _engine(model, runner)
    engine.submit(PROMPTS[0], SamplingParams(max_tokens=N_NEW))
    engine._admit()
    assert not engine.active and len(engine.waiting) == 1  # 150 parked + 109 > 250: it waits
    runner.kv_parked = 0
    engine._admit()
    assert len(engine.active) == 1


def test_a_request_larger_than_the_whole_cache_is_refused_at_submit(model):
    engine = _engine(model, SharedCells(TorchRunner(model, max_slots=4), kv_cells=100))
    with pytest.raises(ValueError, match="KV cells"):
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=20))


def test_the_ladder_only_shrinks_and_ends_in_plain_decoding():
    tree = get_tree("mc_sim_7b_63", 4)
    rungs = ladder(tree)
    assert rungs[0] is tree and rungs[-1].size == 1
    assert all(a.size >= b.size for a, b in zip(rungs, rungs[1:]))
    for r in rungs[1:-1]:  # every cut tree is a sub-tree: each of its paths is one of the tree's
        assert set(r.paths) <= set(tree.paths)
    cut = fit_trees([tree] * 16, [0] * 16, 1024, 238)
    assert sum(t.size for t in cut) <= 1024 and sum(t.n_leaves for t in cut if t.n_leaves > 1) <= 238
    assert fit_trees([chain(2)] * 3, [0] * 3, None, 0) == [chain(2)] * 3  # chains borrow no sequence ids
