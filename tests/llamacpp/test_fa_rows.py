"""nbkit's flash-attention kernel in ggml's CPU backend (nbkit/gguf/patches/fa_rows.inc), which exact mode runs on:
- the llama.cpp this suite runs was built with it (the version of the patch nbkit carries);
- it computes attention: exact mode's logits equal transformers' float32 forward with the same rounding of K and
  V up to float32 summation order, for f16 K + bf16 V and bf16 K + f16 V at a head size on its vector path (64)
  and one off it (16), and for the default f16 K + q8_0 V (V rotated and quantized as llama.cpp holds it);
- its results depend on nothing but the row: bitwise equal for 1 and 2 threads (its work split changes) and in
  blocks of other rows (tests/llamacpp/test_default_mode.py covers other sequences and trees)"""

import os

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

os.environ.setdefault("NBKIT_LLAMA_THREADS", "1")

from helpers import tiny_llama

from nbkit.engine.llamacpp.runner import LlamaCppRunner
from nbkit.engine.runner import TreeInput
from nbkit.gguf import build, patches
from nbkit.gguf.convert import convert
from nbkit.gguf.files import embedded_gguf, gguf_tokenizer
from nbkit.medusa.trees import chain
from nbkit.models import embedded_gguf_path

PROMPT = [(7919 * i + 3) % 49000 + 3 for i in range(150)]  # 150 tokens: several 16-token blocks, rows of 1..150 cells


def test_the_built_llama_cpp_carries_this_kernel():
    assert patches.kernel_digest() == patches.DIGEST
    assert build.installed_bindings() == (build.BINDINGS, False)
    runner = LlamaCppRunner(embedded_gguf(), max_slots=1, n_ctx=256, hidden=False)  # exact: the CPU default
    try:
        assert runner.numerics["attention"] == f"nbkit rows kernel {patches.DIGEST}"  # what /info shows
    finally:
        runner.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """head size -> (a tiny random Llama with 4 heads and 2 K/V heads and SmolLM2's vocabulary, the same weights
    as an f32 GGUF): the caches' rounding is then the only difference from transformers."""
    made: dict[int, tuple] = {}

    def get(head: int):
        if head not in made:
            model = tiny_llama(vocab_size=49152, hidden=4 * head, layers=2, init=0.05)
            work = tmp_path_factory.mktemp(f"fa-{head}")
            model.save_pretrained(work / "hf")
            gguf_tokenizer(embedded_gguf_path()).save_pretrained(work / "hf")  # the GGUF needs one
            made[head] = model, convert(work / "hf", work / "tiny.f32.gguf", outtype="f32")
        return made[head]

    return get


def _runner(gguf, threads: int = 1, **kw) -> LlamaCppRunner:
    return LlamaCppRunner(gguf, max_slots=2, n_ctx=512, n_threads=threads, hidden=False, **kw)


def _along(gguf, threads: int = 1, **kw) -> torch.Tensor:
    """Logits at every position of PROMPT after the first, from one verify of the rest as a chain."""
    runner = _runner(gguf, threads, **kw)
    try:
        slot = runner.alloc()
        runner.prefill({slot: PROMPT[:1]})
        logits, _ = runner.verify([TreeInput(slot, chain(len(PROMPT) - 2), PROMPT[1:])])[slot]
        return logits.float()
    finally:
        runner.close()


def _hadamard(n: int) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix llama.cpp builds (Sylvester's order; symmetric, its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _rounded(x: torch.Tensor, cache: str) -> torch.Tensor:
    """x as a llama.cpp cache of type `cache` holds it: f16/bf16 rounding, or q8_0 as ggml-cpu quantizes a row
    (blocks of 32 values: x * 127 / absmax rounded half to even, kept with the scale absmax / 127 in f16). A
    quantized V cache with a head size that is a multiple of 64 holds V rotated by a 64x64 Hadamard matrix
    (llama.cpp's attn_rot_v; the attention output is rotated back), which comes to rotating back here."""
    if cache == "f32":
        return x
    if cache in ("f16", "bf16"):
        return x.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[cache])).float()
    rot = x.shape[-1] % 64 == 0
    h = _hadamard(64)
    x = (x.float().reshape(*x.shape[:-1], -1, 64) @ h).reshape(x.shape) if rot else x.float()
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = (blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).round()
    y = (q * (amax / 127.0).half().float()).reshape(x.shape)
    return (y.reshape(*y.shape[:-1], -1, 64) @ h).reshape(y.shape) if rot else y


def _reference(model, k_type: str, v_type: str) -> torch.Tensor:
    """transformers' float32 forward with K and V rounded as the caches hold them (every other difference from
    llama.cpp is the order of float32 sums): logits at positions 1.. (the rows verify returns)."""
    def attention(module, query, key, value, attention_mask, **kw):
        return sdpa_attention_forward(module, query, _rounded(key, k_type), _rounded(value, v_type),
                                      attention_mask, **kw)

    AttentionInterface.register("nbkit_cache_rounded", attention)
    saved, model.config._attn_implementation = model.config._attn_implementation, "nbkit_cache_rounded"
    try:
        with torch.inference_mode():
            return model(torch.tensor([PROMPT])).logits[0, 1:].float()
    finally:
        model.config._attn_implementation = saved


# (head size, K cache, V cache) for exact mode: K and V of different types.
CASES = [(64, "f16", "bf16"), (64, "bf16", "f16"), (16, "f16", "bf16"), (16, "bf16", "f16")]


@pytest.mark.parametrize(("head", "k_type", "v_type"), CASES, ids=[f"head{h}-{k}-{v}" for h, k, v in CASES])
def test_exact_attention_is_attention(tiny, head, k_type, v_type):
    """With the caches' f16/bf16 rounding applied to the reference too, only float32 summation order is left:
    a wrong head, cell, mask or normalisation would be off by the logits' spread itself."""
    model, gguf = tiny(head)
    exact = _along(gguf, exact=True, kv_type=k_type, v_type=v_type)
    ref = _reference(model, k_type, v_type)
    err, spread = (exact - ref).abs().max().item(), ref.std().item()
    assert err < 1e-3 * spread, (err, spread)  # measured: 3e-4 of 0.8 (head 64, f16 K + bf16 V)
    assert torch.equal(exact.argmax(-1), ref.argmax(-1))


def test_exact_mode_default_cache_is_attention(tiny):
    """The default exact cache (f16 K, q8_0 V, V rotated by llama.cpp's Hadamard matrix before it is quantized)
    against transformers with the same rotation and q8_0 rounding. Looser than the f16/bf16 bound: the rotation
    is a float32 product before the rounding, so a value at a rounding boundary can land one q8_0 step away."""
    model, gguf = tiny(64)
    exact = _along(gguf, exact=True)
    ref = _reference(model, "f16", "q8_0")
    err, spread = (exact - ref).abs().max().item(), ref.std().item()
    assert err < 5e-3 * spread, (err, spread)  # measured: 1.3e-3 of 0.8 (0.056 without the rotation)
    assert torch.equal(exact.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("head", [64, 16])
def test_results_do_not_depend_on_the_threads(tiny, head):
    """2 threads split a prefill's blocks and a two-token step's heads differently from 1 thread."""
    _, gguf = tiny(head)
    got = []
    for threads in (1, 2):
        runner = _runner(gguf, threads, exact=True, kv_type="f16", v_type="bf16")
        try:
            a, b = runner.alloc(), runner.alloc()
            first = runner.prefill({a: PROMPT[:100], b: PROMPT[50:90]})
            step = runner.prefill({a: PROMPT[100:101], b: PROMPT[90:91]})
            got.append([t[0] for t in (first[a], first[b], step[a], step[b])])
        finally:
            runner.close()
    for one, two in zip(*got):
        assert torch.equal(one, two)
