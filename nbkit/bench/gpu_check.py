"""What a GPU does with our code, in one run: `python -m nbkit.bench.gpu_check [--smoke] [--out FILE]`.

scripts/gpu_check.sh wraps it. The last line printed is one JSON object. Full run (one H100 or A100, at most
8 minutes): random weights of vicuna-7b's shape in float16 (random_model.py, nothing from the hub).
- torch engine: verify cost for 1..128 tokens x batch 1/4/16 (clock read after synchronize()), plain tok/s
  against HF `generate` on the same weights, the policy's choices under the Medusa paper's per-head
  acceptance (top-1 of heads 1-5: 0.56, 0.32, 0.20, 0.15, 0.12) and this card's cost model, sampled
  requests (temperature > 0) served, and the start-up self-check;
- llama.cpp: the CUDA build for this card's architecture (nbkit.gguf.build, in the background while torch
  runs), a Q8_0 of the same weights (nbkit.gguf.convert), the engine's tok/s against llama-cpp-python's
  `Llama` on that file, exact against fast mode (equal answers? speed?), each mode's self-check.
`--smoke` runs every step on a CPU with a tiny model in under 3 minutes, except the CUDA build (the CPU
bindings installed in the venv are used; the JSON says so): `make test` runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..engine.request import SamplingParams
from . import random_model
from .timed import run_batch, tok_s

PAPER_RATES = (0.56, 0.32, 0.20, 0.15, 0.12)  # Medusa paper, vicuna-7b: top-1 acceptance of heads 1..5
VERIFY_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
BATCHES = (1, 4, 16)
N_HEADS = 5


def hf_generate(model, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
    """(tokens, tok/s) of HF `generate`, greedy, batch 1, exactly n new tokens (random weights hit EOS too)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    _sync(model.device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    _sync(model.device)
    return out[0, len(prompt_ids):].tolist(), tok_s(n, time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify_costs(runner, repeats: int) -> dict[str, float]:
    """Milliseconds per verification of batch x tokens (a chain of that many per row over a 64-token prefix)."""
    from ..engine.runner import TreeInput
    from ..engine.speculation.calibration import interleaved_medians
    from ..medusa.trees import chain

    slots = [runner.alloc() for _ in range(max(BATCHES))]
    try:
        runner.prefill({s: [1] * 64 for s in slots})
        calls = {(b, t): (lambda b=b, t=t: runner.verify([TreeInput(s, chain(t - 1), [1] * t) for s in slots[:b]]))
                 for b in BATCHES for t in VERIFY_TOKENS}
        medians = interleaved_medians(calls, repeats, runner.synchronize)
    finally:
        for s in slots:
            runner.free(s)
    return {f"{b}x{t}": round(1000 * s, 3) for (b, t), s in medians.items()}


def policy_choices(cost, n_heads: int) -> dict[str, dict]:
    """The tree the adaptive policy picks for 1, 4 and 16 rows under the paper's acceptance and `cost`."""
    from ..engine.speculation.estimates import AcceptanceStats
    from ..engine.speculation.policy import SpeculationPolicy
    from ..medusa.trees import TOPK, get_tree

    rates = [[q] + [0.0] * (TOPK - 1) for q in PAPER_RATES[:n_heads]]
    stats = AcceptanceStats(n_heads, measured=rates)
    policy = SpeculationPolicy(get_tree("mc_sim_7b_63", n_heads), stats, cost)
    out = {}
    for rows in BATCHES:
        tree = policy.choose(rows, rows)
        out[str(rows)] = {"tree": tree.name, "size": tree.size,
                          "expected_tokens_per_step": round(float(stats.expected_tokens(tree)), 3),
                          "step_cost_over_plain": round(cost.step(rows, tree.size) / cost.step(rows, 1), 3)}
    return out


def sampled_requests(engine, prompts: list[list[int]], n: int) -> dict:
    """Requests with temperature > 0 (the OpenAI routes' default): each must be served, not fail."""
    params = [SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    finished, seconds = run_batch(engine, prompts, params)
    errors = sorted({f.error for f in finished if f.finish_reason == "error"})
    return {"requests": len(prompts), "served": sum(f.finish_reason == "length" for f in finished),
            "errors": errors, "tok_s": tok_s(sum(len(f.token_ids) for f in finished), seconds)}


def torch_steps(model, tokenizer, heads, args) -> dict:
    from ..engine.engine import Engine
    from ..engine.torch_runner import TorchRunner

    prompts = [tokenizer(p)["input_ids"] for p in random_model.PROMPTS]
    hf_tokens, hf_tok_s = hf_generate(model, prompts[0], args.tokens)
    engine = Engine(TorchRunner(model, max_slots=max(BATCHES)), tokenizer, heads, self_check=True,
                    model_name="random-" + args.shape)
    t0 = time.perf_counter()
    engine.prepare()  # the self-check, then the calibration adaptive speculation prices trees with
    prepare_s = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=args.tokens, tree="none", ignore_eos=True)
    run_batch(engine, prompts[:1], [SamplingParams(max_tokens=2, tree="none", ignore_eos=True)])  # warm-up
    (plain,), seconds = run_batch(engine, prompts[:1], [greedy])
    engine_tok_s = tok_s(len(plain.token_ids), seconds)
    engine.prefix.clear(engine)  # the requests' KV kept for reuse holds slots that verify_costs takes
    return {
        "prepare_seconds": round(prepare_s, 2), "self_check": engine.self_check.to_dict(),
        "verify_cost_ms": verify_costs(engine.runner, args.repeats),
        "plain": {"engine_tok_s": engine_tok_s, "hf_generate_tok_s": hf_tok_s,
                  "engine_over_hf": round(engine_tok_s / hf_tok_s, 3), "same_tokens": plain.token_ids == hf_tokens},
        "policy": policy_choices(engine.speculation.cost_model, heads.n_heads),
        "sampled": sampled_requests(engine, prompts, args.tokens),
    }


def start_cuda_build(smoke: bool, log: Path) -> tuple[subprocess.Popen | None, dict]:
    """The llama.cpp CUDA bindings for this card, built (or taken from the cache) in a child while torch runs."""
    if smoke:
        return None, {"skipped": "smoke run: the CPU bindings already installed in the venv are used"}
    from ..gguf.build import detect_cuda_arch

    code = "from nbkit.gguf.build import install_bindings; install_bindings(cuda=True)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, {"arch": detect_cuda_arch(), "started": time.perf_counter()}


def finish_cuda_build(proc: subprocess.Popen | None, info: dict, log: Path) -> dict:
    if proc is None:
        return info
    rc = proc.wait()
    info["seconds"] = round(time.perf_counter() - info.pop("started"), 1)
    info["ok"] = rc == 0
    if rc != 0:
        info["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, every step but the CUDA build")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--workdir", default=None, help="where the random model and its GGUF go (default: a temp dir)")
    args = ap.parse_args(argv)
    args.shape = "tiny" if args.smoke else "vicuna-7b"
    args.device = "cpu" if args.smoke else "cuda"
    args.tokens = 16 if args.smoke else 64
    args.repeats = 3 if args.smoke else 5
    return args


def main(argv: list[str] | None = None) -> dict:
    from ..medusa.heads import MedusaHeads
    from .gpu_check_llama import llama_steps

    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nbkit-gpu-check-"))
    build_log = work / "cuda-build.log"
    work.mkdir(parents=True, exist_ok=True)
    proc, build = start_cuda_build(args.smoke, build_log)
    result: dict = {"mode": "smoke" if args.smoke else "full", "shape": args.shape, "dtype": "float16",
                    "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                    "torch_version": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model, tokenizer = random_model.build(work / "hf", args.shape, args.device, torch.float16)
    heads = MedusaHeads(model.config.hidden_size, N_HEADS).to(device=model.device, dtype=torch.float16).eval()
    result["torch"] = torch_steps(model, tokenizer, heads, args)
    del model
    gc.collect()  # the torch engine and its KV cache go before llama.cpp loads the same weights
    if args.device == "cuda":
        torch.cuda.empty_cache()
    result["llamacpp"] = {"cuda_build": finish_cuda_build(proc, build, build_log)}
    result["llamacpp"].update(llama_steps(work, tokenizer, heads, args))
    result["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
