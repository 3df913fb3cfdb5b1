"""Batch-1 greedy benchmark on held-out prompts: HF generate vs nbkit plain vs nbkit Medusa.

    python -m nbkit.bench.single [--prompts 12] [--max-tokens 128] [--trees auto,mc_sim_7b_63,chain-2]

All configurations run in this one process on the same loaded model, interleaved prompt by prompt
(so machine noise hits them alike), and the script prints ratios. The prompts are held out from the
heads' training set. Medusa output is checked to be identical to plain greedy output.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nbkit.bench import report_json
from nbkit.bench.closed_loop import machine_name
from nbkit.chat_format import user_prompt_ids
from nbkit.engine.engine import Engine
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.medusa.prompts import distill_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--trees", default="auto,mc_sim_7b_63,chain-2")
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    proto = load_engine("torch", args.model, args.heads, max_batch=1, speculation="adaptive")
    proto.prepare()
    model, tok = proto.runner.model, proto.tokenizer
    engines = {"plain": Engine(proto.runner.fresh(1), tok, None, speculation="off")}
    for t in args.trees.split(","):
        spec = "adaptive" if t == "auto" else t
        engines[t] = Engine(proto.runner.fresh(1), tok, proto.heads, speculation=spec,
                            cost_model=proto.speculation.cost_model)
    _, held_out = distill_prompts()
    prompts = held_out[-args.prompts:]  # the hand-written ones are at the end; no template overlap
    ids = [user_prompt_ids(tok, p) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens)
    tokens = {k: 0 for k in ["hf", *engines]}
    seconds = {k: 0.0 for k in tokens}
    accepted = {k: [] for k in engines}
    mismatches = {k: 0 for k in engines}
    engines["plain"].generate(ids[0], SamplingParams(max_tokens=8))  # warm-up
    for x in ids:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([x]), max_new_tokens=args.max_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        seconds["hf"] += time.perf_counter() - t0
        hf = out[0, len(x):].tolist()
        tokens["hf"] += len(hf)
        plain = None
        for name, engine in engines.items():
            t0 = time.perf_counter()
            res = engine.generate(x, params)
            seconds[name] += time.perf_counter() - t0
            tokens[name] += res.completion_tokens
            accepted[name].append(res.mean_accepted)
            if name == "plain":
                plain = res.token_ids
            elif res.token_ids != plain:
                mismatches[name] += 1
    rate = {k: tokens[k] / seconds[k] for k in tokens}
    result = {
        "machine": machine_name(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "prompts": len(ids), "max_tokens": args.max_tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in rate.items()},
        "ratio_vs_plain": {k: round(v / rate["plain"], 3) for k, v in rate.items()},
        "mean_accepted_per_step": {k: round(statistics.mean(v), 3) for k, v in accepted.items()},
        "outputs_differing_from_plain": mismatches,
        "adaptive_tree_choices": engines.get("auto").speculation.choices if "auto" in engines else None,
    }
    report_json(result, args.out)


if __name__ == "__main__":
    main()
