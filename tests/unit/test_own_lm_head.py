"""Heads that carry their own lm_head (FasterDecoding's format) never read the runner's lm_head: on llama.cpp
reading it dequantizes a dense [V, H] copy of the GGUF's output weights (262 MB for vicuna, 250 MiB of a
T4) that such heads never use. Shared-lm_head heads still read it."""

import pytest
from helpers import FaultyRunner, ToyTokenizer, tiny_llama

from nbkit.engine.engine import Engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.speculation import CostModel
from nbkit.engine.speculation.calibration import calibrate
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.heads import MedusaHeads


class CountingLmHead(FaultyRunner):
    """The torch runner, counting reads of its lm_head."""

    def __init__(self, runner):
        super().__init__(runner)
        self.lm_head_reads = 0

    @property
    def lm_head(self):
        self.lm_head_reads += 1
        return self.inner.lm_head


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("own", [True, False])
def test_only_shared_lm_head_heads_read_the_runners_lm_head(model, own):
    runner = CountingLmHead(TorchRunner(model, max_slots=2))
    heads = MedusaHeads(64, 3, vocab_size=256 if own else None).eval()
    engine = Engine(runner, ToyTokenizer(), heads, speculation="chain-2", cost_model=CostModel({1: 0.01}))
    engine.generate([5, 17, 42, 9, 33], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.prefix.clear(engine)  # the finished request's KV is kept for reuse: calibration needs every slot
    calibrate(runner, heads, max_batch=2, max_tree=4, repeats=1, max_tokens=8)
    if own:
        assert runner.lm_head_reads == 0  # the old engine and calibration read it on every heads call
    else:
        assert runner.lm_head_reads > 0
