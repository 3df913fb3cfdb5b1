"""The llama.cpp side of the memory arithmetic: what a LlamaCppRunner allocates for vicuna-7b and vicuna-13b
(computed from their config shapes, no weights) agrees within 5% with the plan of nbkit/notebook/env.py on a
T4, an L4, an A100-40 and an A100-80, and its KV cache stays inside the plan's budget."""

import json

import pytest

from nbkit.engine.llamacpp.sizing import ModelShape, context_cells, kv_bytes_per_cell, runner_bytes, weight_bytes
from nbkit.notebook import env

GIB = 2**30
VICUNA = {
    "vicuna-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                      vocab_size=32000),
    "vicuna-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824,
                       vocab_size=32000),
}
CARDS = {"T4": 15.0, "L4": 22.5, "A100-40": 40.0, "A100-80": 80.0}
N_CTX_TRAIN, SLOTS = 2048, 16


def _gpu_env(total_gib: float) -> env.Environment:
    gpu = env.Gpu("card", total_gib, total_gib, (8, 0))
    return env.Environment(colab=True, python="3.12", torch="2", cuda="12.4", gpus=[gpu])


def _sizes(cfg: dict, tmp_path) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return env.sizes_from_config(tmp_path)


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("name", VICUNA)
def test_runner_allocation_agrees_with_the_plan(name, card, tmp_path):
    cfg, memory = VICUNA[name], CARDS[card]
    shape = ModelShape.from_config(cfg)
    try:
        plan = env.resolve_plan("llamacpp", "auto", env=_gpu_env(memory), sizes=_sizes(cfg, tmp_path))
    except env.PlanError:  # the plan refuses: the runner's own arithmetic must not fit either
        least = weight_bytes(shape, "q4_k_m") + N_CTX_TRAIN * kv_bytes_per_cell(
            shape.num_hidden_layers, shape.kv_dim, "f16", "f16")
        assert least / GIB + env.CUDA_OVERHEAD_GIB > memory - 2.0  # the heads alone are ~1.5 GiB
        return
    budget = int(plan.kv_gib * GIB)
    # On a GPU the runner serves the fast mode: f16 K and V (sizing.choose_mode).
    cells = context_cells(SLOTS, N_CTX_TRAIN, kv_bytes_per_cell(shape.num_hidden_layers, shape.kv_dim, "f16", "f16"),
                          budget)
    got = runner_bytes(shape, plan.quantization.lower(), cells, "f16", "f16", n_batch=64 * SLOTS)
    assert got["weights"] / GIB == pytest.approx(plan.weights_gib, rel=0.05)
    assert got["kv"] <= budget
    assert got["kv"] / GIB == pytest.approx(plan.kv_gib, rel=0.05)
    assert got["lm_head"] == 0  # FasterDecoding's heads carry their own lm_head: no dense copy
    # Weights, KV and llama.cpp's output buffers, plus the heads, fit what the plan reserves.
    assert sum(got.values()) / GIB + plan.heads_gib <= plan.need_gib


def test_kv_cells_follow_the_budget_and_never_exceed_every_slot_at_full_context():
    per_cell = kv_bytes_per_cell(32, 4096, "f16", "f16")  # vicuna-7b: 0.5 MiB a cell
    assert per_cell == 2**19
    assert context_cells(16, 2048, per_cell, 4 * GIB) == 8192  # the plan's 4 GiB, not 2048 cells for 16 slots
    assert context_cells(2, 2048, per_cell, 4 * GIB) == 4096  # two slots at the full 2048 each
    assert context_cells(16, 2048, per_cell, 4 * GIB + 2**20) == 8192  # rounded down to llama.cpp's 256
    with pytest.raises(ValueError, match="fewer than 256"):
        context_cells(16, 2048, per_cell, 100 * 2**20)


def test_the_mode_follows_the_device_and_the_head_size():
    from nbkit.engine.llamacpp.sizing import choose_mode

    cpu = choose_mode(None, on_cpu=True, head_dim=128, kv_type="f16", v_type=None, flash_attn=None)
    assert (cpu.exact, cpu.k_type, cpu.v_type) == (True, "f16", "q8_0") and "CPU" in cpu.reason
    gpu = choose_mode(None, on_cpu=False, head_dim=128, kv_type="f16", v_type=None, flash_attn=None)
    assert (gpu.exact, gpu.v_type) == (False, "f16") and "GPU" in gpu.reason
    small = choose_mode(None, on_cpu=True, head_dim=16, kv_type="f16", v_type=None, flash_attn=None)
    assert (small.exact, small.v_type) == (True, "f16") and "head size 16" in small.reason
    asked = choose_mode(True, on_cpu=False, head_dim=128, kv_type="f16", v_type=None, flash_attn=None)
    assert asked.exact and asked.reason == "set by the caller"
    with pytest.raises(ValueError, match="flash attention"):
        choose_mode(True, on_cpu=True, head_dim=128, kv_type="f16", v_type=None, flash_attn=False)
