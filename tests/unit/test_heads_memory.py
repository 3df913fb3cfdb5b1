"""FasterDecoding's heads load once, straight into the serving dtype: no fp32 copy of a head's lm_head on
the way (0.74 B parameters for vicuna-7b: an fp32 detour costs GB of Colab's RAM), and the notebook's
inspection reads keys and shapes only."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nbkit.medusa.heads import HeadsFormatError, load_heads
from nbkit.notebook import hub

HIDDEN, VOCAB, N_HEADS = 64, 4096, 5


class Allocations(TorchDispatchMode):
    """Every real (non-meta) tensor that an op creates: (dtype, numel). While `mapping` is set (torch.load
    with mmap=True builds tensors over the file's pages, which cost no RAM) nothing is recorded."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, int]] = []
        self.mapping = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if self.mapping else out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.seen.append((t.dtype, t.numel()))
        return out


@pytest.fixture
def faster_decoding_heads(tmp_path):
    """A FasterDecoding-layout checkpoint: bf16, own lm_head per head, config.json claiming 2 heads."""
    torch.manual_seed(0)
    state = {}
    for i in range(N_HEADS):
        state[f"{i}.0.linear.weight"] = torch.randn(HIDDEN, HIDDEN, dtype=torch.bfloat16) * 0.02
        state[f"{i}.0.linear.bias"] = torch.zeros(HIDDEN, dtype=torch.bfloat16)
        state[f"{i}.1.weight"] = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16) * 0.02
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    return tmp_path, state


@pytest.fixture
def watch(monkeypatch):
    """(Allocations, the kwargs of each torch.load call); what torch.load itself maps is not recorded."""
    loads, real_load, mode = [], torch.load, Allocations()

    def load(*args, **kwargs):
        loads.append(kwargs)
        mode.mapping = True
        try:
            return real_load(*args, **kwargs)
        finally:
            mode.mapping = False

    monkeypatch.setattr(torch, "load", load)
    return mode, loads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_heads_load_once_in_the_serving_dtype(faster_decoding_heads, dtype, watch):
    path, state = faster_decoding_heads
    mode, loads = watch
    with mode:
        heads = load_heads(path, HIDDEN, dtype=dtype)
    assert len(loads) == 1 and loads[0].get("mmap") is True
    assert heads.n_heads == N_HEADS and {p.dtype for p in heads.parameters()} == {dtype}
    big = [(d, n) for d, n in mode.seen if n >= VOCAB * HIDDEN]
    assert all(d == dtype for d, _ in big), big  # no fp32 (or other) copy of a head's lm_head on the way
    assert len(big) == N_HEADS  # each lm_head materialized exactly once
    assert torch.equal(heads.heads[3][1].weight, state["3.1.weight"].to(dtype))
    hidden = torch.randn(2, HIDDEN, dtype=dtype)
    assert heads.topk(hidden, None, 4).shape == (2, N_HEADS, 4)


def test_inspection_reads_only_shapes(faster_decoding_heads, tmp_path, watch):
    path, _ = faster_decoding_heads
    mode, loads = watch
    with mode:
        info = hub.inspect_heads(path)
    assert [k.get("mmap") for k in loads] == [True]
    assert (info.n_heads, info.n_layers, info.own_lm_head, info.config_heads) == (N_HEADS, 1, True, 2)
    assert not [n for _, n in mode.seen if n >= VOCAB * HIDDEN]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": HIDDEN * 2, "vocab_size": VOCAB}))
    with pytest.raises(HeadsFormatError, match="hidden size"):
        hub.inspect_heads(path, model)
    (model / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "vocab_size": VOCAB + 1}))
    with pytest.raises(HeadsFormatError, match="vocabulary"):
        hub.inspect_heads(path, model)
