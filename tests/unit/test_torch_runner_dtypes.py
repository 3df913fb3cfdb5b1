"""The torch runner's attention masks in the dtypes the GPUs serve: finite, with finfo(dtype).min where a
position is hidden (a -inf mask turns into NaN as soon as anything subtracts it from itself)."""

import pytest
import torch
from helpers import tiny_llama

from nbkit.engine.runner import TreeInput
from nbkit.engine.torch_runner import TorchRunner
from nbkit.medusa.trees import get_tree


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masks_are_finite_and_use_the_dtypes_minimum(dtype, monkeypatch):
    runner = TorchRunner(tiny_llama(seed=2, vocab_size=64, hidden=32).to(dtype), max_slots=3)
    masks = []
    forward = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda ids, pos, mask, ctx: masks.append(mask) or forward(ids, pos, mask, ctx))
    slots = [runner.alloc() for _ in range(3)]
    runner.prefill({s: [5 + i] * (3 + 4 * i) for i, s in enumerate(slots)})  # ragged: padding is masked
    tree = get_tree("mc_sim_7b_63", 4)
    out = runner.verify([TreeInput(s, tree if i else get_tree("chain-2", 4), [7] * (tree.size if i else 3))
                         for i, s in enumerate(slots)])
    assert len(masks) == 2
    for mask in masks:
        assert mask.dtype == dtype and torch.isfinite(mask).all()
        assert set(mask.unique().tolist()) == {0.0, torch.finfo(dtype).min}
    assert all(torch.isfinite(logits).all() for logits, _ in out.values())
