"""gpu_check's llama.cpp half: a Q8_0 of the random model, our engine against llama-cpp-python's `Llama`,
exact mode against fast mode. Run after the torch half (gpu_check.py), in the same process: the CUDA
bindings are installed by then and not yet imported."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from ..engine.request import SamplingParams
from . import random_model
from .timed import run_batch, tok_s

BATCH = 4  # requests decoded together in the exact / fast comparison


def to_q8_0(work: Path) -> tuple[Path, dict]:
    """The random model's HF folder -> f16 GGUF -> Q8_0 (nbkit.gguf.convert), timed."""
    from ..gguf.convert import convert

    t0 = time.perf_counter()
    gguf = convert(work / "hf", work / "gguf" / "model.Q8_0.gguf", outtype="f16", quantize_to="Q8_0")
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    return gguf, {"seconds": round(seconds, 1), "q8_0_mib": round(gguf.stat().st_size / 2**20, 1),
                  "hf_mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 1)}


def llama_python(gguf: Path, prompt_ids: list[int], n: int, gpu: bool) -> dict:
    """llama-cpp-python's own `Llama` on the file: greedy, batch 1."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_gpu_layers=-1 if gpu else 0, n_ctx=512, verbose=False, seed=0)
    try:
        llm.create_completion(prompt_ids, max_tokens=2, temperature=0.0)  # warm-up
        t0 = time.perf_counter()
        out = llm.create_completion(prompt_ids, max_tokens=n, temperature=0.0, logit_bias={2: -1e9})
        seconds = time.perf_counter() - t0
    finally:
        llm.close()
        del llm
        gc.collect()
    return {"tok_s": tok_s(out["usage"]["completion_tokens"], seconds)}


def engine_mode(gguf: Path, heads, exact: bool, prompts: list[list[int]], n: int, gpu: bool) -> dict:
    """One llama.cpp mode: its self-check, plain tok/s at batch 1, and a batch of Medusa greedy answers."""
    from ..engine.loader import load_engine

    engine = load_engine("llamacpp", str(gguf), heads=heads, max_batch=BATCH, speculation="mc_sim_7b_63",
                         exact=exact, n_gpu_layers=-1 if gpu else 0)
    try:
        engine.prepare()
        plain = SamplingParams(max_tokens=n, tree="none", ignore_eos=True)
        run_batch(engine, prompts[:1], [SamplingParams(max_tokens=2, tree="none", ignore_eos=True)])  # warm-up
        (one,), seconds = run_batch(engine, prompts[:1], [plain])
        greedy = [SamplingParams(max_tokens=n, ignore_eos=True) for _ in prompts[:BATCH]]
        batch, batch_s = run_batch(engine, prompts[:BATCH], greedy)
        return {"self_check": engine.self_check.to_dict(), "plain_tok_s": tok_s(len(one.token_ids), seconds),
                "plain_tokens": one.token_ids, "batch_tok_s": tok_s(sum(len(f.token_ids) for f in batch), batch_s),
                "answers": [f.token_ids for f in batch], "errors": sorted({f.error for f in batch if f.error})}
    finally:
        close = getattr(engine.runner, "close", None)
        if close is not None:
            close()  # one model in memory at a time
        del engine
        gc.collect()


def llama_steps(work: Path, tokenizer, heads, args) -> dict:
    if args.device == "cuda" and not _gpu_bindings():
        return {"skipped": "llama-cpp-python has no GPU offload (the CUDA build failed?)"}
    gpu = args.device == "cuda"
    prompts = [tokenizer(p)["input_ids"] for p in random_model.PROMPTS]
    gguf, conversion = to_q8_0(work)
    reference = llama_python(gguf, prompts[0], args.tokens, gpu)
    modes = {name: engine_mode(gguf, heads, exact, prompts, args.tokens, gpu)
             for name, exact in (("exact", True), ("fast", False))}
    exact, fast = modes["exact"], modes["fast"]
    return {
        "convert_q8_0": conversion, "llama_python_tok_s": reference["tok_s"],
        "engine_over_llama_python": round(exact["plain_tok_s"] / max(reference["tok_s"], 1e-9), 3),
        "exact": _summary(exact), "fast": _summary(fast),
        "exact_equals_fast": exact["answers"] == fast["answers"] and exact["plain_tokens"] == fast["plain_tokens"],
        "fast_over_exact_batch": round(fast["batch_tok_s"] / max(exact["batch_tok_s"], 1e-9), 3),
    }


def _summary(mode: dict) -> dict:
    return {k: v for k, v in mode.items() if k not in ("answers", "plain_tokens")}


def _gpu_bindings() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())
