"""The llama.cpp runner on the way to a GPU, checked on the CPU build:

- one model per process: fresh() (benchmarks, the supervisor's restart) shares the loaded weights;
- the mode: with GPU offload the fast configuration (no CPU-kernel ubatch caps or padding), and /info says why;
- a head size that q8_0 cannot hold (16) gets a working exact mode, and a failed context names llama.cpp's
  own reason;
- the context is sized from the plan's KV budget, llama.cpp's own report agrees with our arithmetic, and the
  engine admits by the shared cells so "context is full" never fails a batch.
"""

import os
import re
import time

import pytest
import torch
from helpers import FaultyRunner, tiny_llama

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

import llama_cpp

from nbkit.engine.engine import Engine
from nbkit.engine.llamacpp import lm_head as lm_head_module
from nbkit.engine.llamacpp import runner as runner_module
from nbkit.engine.llamacpp.context import LlamaContext
from nbkit.engine.llamacpp.runner import EXACT_UBATCH, LlamaCppRunner
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.engine.runner import TreeInput
from nbkit.engine.speculation import CostModel
from nbkit.gguf.convert import convert
from nbkit.gguf.files import gguf_tokenizer
from nbkit.medusa.heads import MedusaHeads
from nbkit.medusa.trees import chain
from nbkit.models import embedded_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture
def loads(monkeypatch):
    """Counts llama_model_load_from_file calls."""
    calls = []
    real = llama_cpp.llama_model_load_from_file

    def counting(path, params):
        calls.append(path)
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", counting)
    return calls


def test_fresh_and_a_restart_share_the_loaded_model(loads):
    # The old fresh() loaded the GGUF again while the first copy was loaded (2 x 6.7 GiB on a 14.7 GiB T4:
    # "not a GGUF model file?", and the restarted engine stayed dead).
    first = LlamaCppRunner(embedded_gguf_path(), max_slots=2, n_ctx=512, hidden=False)
    loaded = len(loads)
    assert loaded <= 1  # 0 when another test of this process still holds the model
    second = first.fresh()
    assert second.context.model == first.context.model and len(loads) == loaded
    assert LlamaContext not in type(first).__mro__  # composition: the runner owns its context
    second.close()
    engine = Engine(FaultyRunner(first), gguf_tokenizer(embedded_gguf_path()), None, speculation="off")
    engine.loop.restart_delay = 0.0
    engine.start()
    try:
        def crash(state):
            raise SystemExit("injected crash")

        engine.runner.fault = crash
        broken = engine.submit([1, 2, 3], SamplingParams(max_tokens=4))
        assert broken.result(timeout=60).finish_reason == "error"
        deadline = time.monotonic() + 30
        while engine.counters["restarts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.counters["restarts"] == 1 and engine.runner.fault is None
        ok = engine.submit([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)).result(timeout=60)
        assert ok.finish_reason == "length" and len(ok.token_ids) == 4  # the restarted engine serves
        assert len(loads) == loaded  # no second copy of the weights
        assert first.context.ctx is None  # the crashed runner's KV cache was freed at once
    finally:
        engine.stop()


def test_gpu_offload_serves_the_fast_mode_and_says_why(monkeypatch):
    # The old runner ran exact mode on a GPU too: every verify padded into 63-token ubatches, a guarantee
    # shown only for ggml's CPU kernels. "GPU" here is the offload decision, forced on the CPU build.
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    gpu = LlamaCppRunner(embedded_gguf_path(), max_slots=2, n_ctx=512, hidden=False)
    assert not gpu.on_cpu and gpu.mode == "fast" and not gpu.recomputes_accepted
    assert gpu.context.n_ubatch > EXACT_UBATCH and not gpu.context.pad_single and (gpu.k_type, gpu.v_type) == ("f16", "f16")
    assert "GPU" in gpu.numerics["mode_reason"] and gpu.numerics["mode"] == "fast"
    forced = LlamaCppRunner(embedded_gguf_path(), max_slots=2, n_ctx=512, hidden=False, exact=True)
    assert forced.mode == "exact" and forced.numerics["mode_reason"] == "set by the caller"
    gpu.close()
    forced.close()
    monkeypatch.undo()
    cpu = LlamaCppRunner(embedded_gguf_path(), max_slots=2, n_ctx=512, hidden=False)
    assert cpu.on_cpu and cpu.mode == "exact" and cpu.v_type == "q8_0" and "CPU" in cpu.numerics["mode_reason"]


@pytest.fixture(scope="module")
def head16_gguf(tmp_path_factory):
    """A tiny Llama whose head size is 16 (hidden 64, 4 heads): too small for a q8_0 cache row."""
    out = tmp_path_factory.mktemp("head16")
    tiny_llama(vocab_size=49152, hidden=64, layers=2).save_pretrained(out)
    gguf_tokenizer(embedded_gguf_path()).save_pretrained(out)
    return convert(out, tmp_path_factory.mktemp("gguf") / "head16.f16.gguf", outtype="f16")


def test_a_head_size_of_16_gets_a_working_exact_mode(head16_gguf):
    # The old exact mode always took a q8_0 V cache on the CPU: no context ("out of memory? try a smaller
    # n_ctx"), whatever n_ctx.
    runner = LlamaCppRunner(head16_gguf, max_slots=2, n_ctx=512)
    assert runner.mode == "exact" and runner.v_type == "f16" and runner.context.pad_single
    assert "head size 16" in runner.numerics["mode_reason"]
    slot = runner.alloc()
    logits, _ = runner.prefill({slot: [1, 9690, 198, 2683, 359]})[slot]
    out = runner.verify([TreeInput(slot, chain(2), [int(logits.argmax()), 5, 6])])
    assert torch.isfinite(out[slot][0]).all() and out[slot][1].shape == (3, 64)
    runner.close()


def test_a_failed_context_names_llama_cpps_reason(head16_gguf):
    with pytest.raises(RuntimeError) as err:
        LlamaCppRunner(head16_gguf, max_slots=2, n_ctx=512, v_type="q8_0")
    assert "does not divide n_embd_head_v=16" in str(err.value) and "out of memory" not in str(err.value)


def test_the_context_is_sized_from_the_kv_budget_and_llama_cpp_agrees():
    probe = LlamaCppRunner(embedded_gguf_path(), max_slots=4, n_ctx=256, hidden=False)
    per_cell = probe.context.kv_bytes_per_cell
    probe.close()
    runner = LlamaCppRunner(embedded_gguf_path(), max_slots=4, hidden=False, kv_budget_bytes=int(1280.5 * per_cell))
    assert runner.n_ctx == runner.kv_cells == 1280  # the budget's cells, rounded down to llama.cpp's 256
    # llama.cpp's own report of what it allocated: "llama_kv_cache: size = X MiB (N cells, ...)".
    sizes = [float(m.group(1)) for line in runner.context.kv_log if (m := re.search(r"size =\s*([\d.]+) MiB \(\s*\d+ cells", line))]
    assert sizes and abs(sizes[0] - 1280 * per_cell / 2**20) < 0.01
    assert abs(runner.kv_bytes() / 2**20 - sizes[0]) < 0.01  # what /metrics reports as nbkit_kv_cache_bytes
    assert runner.max_context == 1280  # what the engine advertises per request


def test_admission_by_cells_never_fills_the_context():
    # 3 x (200 prompt + 20 new + 2) tokens in 512 cells: the old engine ran all three and llama.cpp's
    # "context is full" failed the whole batch; now the third waits for the first two.
    engine = load_engine("llamacpp", None, heads="none", max_batch=3, speculation="off", n_ctx=512)
    prompts = [[100 + i] * 200 for i in range(3)]
    handles = [engine.submit(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts]
    peak = 0
    while any(h.finished is None for h in handles):
        engine.step()
        peak = max(peak, len(engine.active))
    assert [h.result().finish_reason for h in handles] == ["length"] * 3
    assert peak == 2
    engine.prefix.clear(engine)  # the finished requests' KV kept for reuse: let it go, the context is idle
    runner = engine.runner  # exact mode parks a finished slot's cells until the context is idle
    a, b = runner.alloc(), runner.alloc()
    runner.prefill({a: [5] * 30, b: [6] * 40})
    runner.free(a)
    assert runner.kv_parked == 30
    runner.free(b)
    assert runner.kv_parked == 0 and runner.seq_ranges() == {}
    with pytest.raises(ValueError, match="exceeds"):
        engine.submit([7] * 500, SamplingParams(max_tokens=20))


@pytest.mark.parametrize("own", [True, False])
def test_own_lm_head_heads_never_dequantize_the_gguf_lm_head(monkeypatch, own):
    calls = []
    real = lm_head_module.gguf_lm_head
    monkeypatch.setattr(runner_module, "gguf_lm_head", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    heads = MedusaHeads(576, 2, vocab_size=49152 if own else None)
    engine = load_engine("llamacpp", None, heads=heads, max_batch=2, speculation="chain-2", n_ctx=512,
                         cost_model=CostModel.from_function(lambda n: 0.01))
    engine.prepare()
    engine.generate([1, 9690, 198, 2683], SamplingParams(max_tokens=6, ignore_eos=True))
    assert (len(calls) == 0) == own


def test_a_file_llama_cpp_cannot_load_is_refused_with_its_reason(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ValueError) as err:
        LlamaCppRunner(junk, max_slots=1, n_ctx=256, hidden=False)
    assert "could not load" in str(err.value) and "magic" in str(err.value).lower()
