"""The llama.cpp engine's exact (batch-invariant, lossless) mode against its fast mode, side by side in one run.

  python -m nbkit.bench.llamacpp_exact [--threads 1] [--tokens 64] [--out docs/bench/llamacpp_exact.json]

Embedded Q8_0 GGUF, shipped heads, greedy, 64-token answers to held-out chat prompts. For each mode
(exact, fast) three engines: speculation off (no heads), adaptive, and the fixed tree mc_sim_7b_63.
  concurrency 1:  every engine, one prompt per wave, waves rotate over the engines (interleaved);
  concurrency 16: off and adaptive, waves of 16 prompts, rotating;
  concurrency 4:  mc_sim_7b_63 (a 42-leaf tree per request: llama.cpp's 256 sequence ids allow 5 at once).
Plus exact_f16v: exact mode with an f16 V cache (ubatches <= 63, padded single tokens), speculation off:
the cost of the knob the default avoids; and the q8_0 V cache's logits against the f16 one (both exact).
Reports tok/s per engine, exact/fast ratios, adaptive/off (the floor: >= 0.98 at 1 and 16), and the
match rates per mode: tree vs off (same prompt, solo), and concurrent vs solo answers. The JSON keeps every
figure and the tree choices, not the answers' token ids (the match rates are computed from them in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nbkit.bench.llamacpp import EnginePeer, heads_arg, interleaved, write_report
from nbkit.chat_format import user_prompt_ids
from nbkit.engine.llamacpp.runner import LlamaCppRunner
from nbkit.engine.loader import load_engine
from nbkit.engine.runner import TreeInput
from nbkit.gguf.files import embedded_gguf, gguf_tokenizer
from nbkit.medusa.prompts import distill_prompts
from nbkit.medusa.trees import chain
from nbkit.models import embedded_gguf_path

MODES = ("exact", "fast")
# exact_f16v: the exact mode with an f16 V cache, which must pad single-token ubatches (the knob's cost).
# exact_kq8: the exact mode with a q8_0 K cache and an f16 V cache (the other way to make the types differ).
MODE_ARGS = {"exact": {"exact": True}, "fast": {"exact": False}, "exact_f16v": {"exact": True, "v_type": "f16"},
             "exact_kq8": {"exact": True, "kv_type": "q8_0", "v_type": "f16"}}
TREE = "mc_sim_7b_63"


def engines_for(mode: str, gguf: Path, heads, threads: int, max_batch: int,
                kinds=("off", "adaptive", TREE)) -> dict[str, EnginePeer]:
    """One engine per kind of speculation in `mode` (MODES / MODE_ARGS)."""
    peers = {}
    for kind in kinds:
        engine = load_engine("llamacpp", gguf, heads="none" if kind == "off" else heads, max_batch=max_batch,
                             speculation=kind, n_threads=threads, **MODE_ARGS[mode])
        if kind == "adaptive":
            engine.prepare()  # calibration is not part of the timed runs
        peers[f"{mode}_{kind}"] = EnginePeer(engine, f"{mode} {kind}")
    return peers


def kv_quality(gguf: Path, texts: list[list[int]], threads: int) -> dict:
    """The exact mode's q8_0 V cache against the f16 one (both exact), per position along real answers."""
    top1, kls = [], []
    for ids in texts:
        a = logits_along(gguf, ids, threads, v_type="f16")
        b = logits_along(gguf, ids, threads, v_type="q8_0")
        top1.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
        kls.append(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item())
    return {"top1_agreement": sum(top1) / len(top1), "mean_kl": sum(kls) / len(kls), "answers": len(texts)}


def logits_along(gguf: Path, ids: list[int], threads: int, v_type: str) -> torch.Tensor:
    runner = LlamaCppRunner(gguf, max_slots=1, n_threads=threads, hidden=False, exact=True, v_type=v_type)
    slot = runner.alloc()
    runner.prefill({slot: ids[:1]})
    logits, _ = runner.verify([TreeInput(slot, chain(len(ids) - 2), ids[1:])])[slot]
    runner.close()
    return logits


def match(a: list[list[int]], b: list[list[int]]) -> float:
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n


def summary(res: dict, modes: list[str]) -> dict:
    """Ratios and match rates from {concurrency: {engine: result}}."""
    tps = {c: {k: v["tokens_per_s"] for k, v in r.items()} for c, r in res.items()}
    out: dict = {"over_fast": {}, "over_fast_median_per_wave": {}, "adaptive_over_off": {}, "match": {}}
    for c, t in tps.items():
        for mode in modes:
            for kind in ("off", "adaptive", TREE):
                if mode != "fast" and f"{mode}_{kind}" in t and f"fast_{kind}" in t:
                    out["over_fast"][f"c{c}_{mode}_{kind}"] = t[f"{mode}_{kind}"] / t[f"fast_{kind}"]
                    # Paired by wave (same prompts, served back to back): robust to a burst of load.
                    mine, fast = (res[c][f"{m}_{kind}"]["wave_tokens_per_s"] for m in (mode, "fast"))
                    out["over_fast_median_per_wave"][f"c{c}_{mode}_{kind}"] = statistics.median(
                        a / b for a, b in zip(mine, fast))
            if f"{mode}_adaptive" in t:
                out["adaptive_over_off"][f"c{c}_{mode}"] = t[f"{mode}_adaptive"] / t[f"{mode}_off"]
    for mode in modes:
        solo = res[1][f"{mode}_off"]["outputs"]
        m = {f"c1_{kind}_vs_off": match(res[1][f"{mode}_{kind}"]["outputs"], solo) for kind in ("adaptive", TREE)
             if f"{mode}_{kind}" in res[1]}
        for c, r in res.items():
            if c == 1:
                continue
            for kind in ("off", "adaptive", TREE):
                if f"{mode}_{kind}" in r:
                    m[f"c{c}_{kind}_vs_c1_off"] = match(r[f"{mode}_{kind}"]["outputs"], solo)
        m["prompts_compared"] = len(solo)
        out["match"][mode] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts-c1", type=int, default=8)
    ap.add_argument("--prompts-c16", type=int, default=32)
    ap.add_argument("--tree-concurrency", type=int, default=4)
    ap.add_argument("--kinds", default=f"off,adaptive,{TREE}", help="speculation per engine (a subset: a focused run)")
    ap.add_argument("--modes", default="exact,fast,exact_f16v", help=f"of {', '.join(MODE_ARGS)}")
    ap.add_argument("--out", default="bench-out/llamacpp_exact.json")
    args = ap.parse_args()
    if args.tree_concurrency in (1, 16):
        ap.error("--tree-concurrency must differ from 1 and 16 (results are keyed by concurrency)")
    os.environ["NBKIT_LLAMA_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    gguf = embedded_gguf("Q8_0")
    tokenizer = gguf_tokenizer(embedded_gguf_path())
    texts = distill_prompts()[1][: max(args.prompts_c1, args.prompts_c16)]
    prompts = [user_prompt_ids(tokenizer, t) for t in texts]
    heads, heads_note = heads_arg()
    report = {"command": " ".join(sys.argv), "gguf": gguf.name, "threads": args.threads, "tokens": args.tokens,
              "heads": heads_note, "machine": platform.processor() or platform.machine(),
              "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    peers, kinds, modes = {}, tuple(args.kinds.split(",")), args.modes.split(",")
    for mode in modes:  # the variants run speculation off only
        peers |= engines_for(mode, gguf, heads, args.threads, 16, kinds=kinds if mode in MODES else ("off",))
    ct = args.tree_concurrency
    res = {1: interleaved(peers, prompts[: args.prompts_c1], args.tokens, 1, 1)}
    print_block(1, res[1])
    wide = {k: p for k, p in peers.items() if not k.endswith(TREE)}
    res[16] = interleaved(wide, prompts[: args.prompts_c16], args.tokens, 16, 16)
    print_block(16, res[16])
    if TREE in kinds:
        trees = {k: p for k, p in peers.items() if k.endswith(TREE) or k in ("exact_off", "fast_off")}
        res[ct] = interleaved(trees, prompts[: 2 * ct], args.tokens, ct, ct)
        print_block(ct, res[ct])
    for p in peers.values():
        p.close()
    report["results"] = {f"c{c}": r for c, r in res.items()}
    report["summary"] = summary(res, modes)
    answers = [p + o for p, o in zip(prompts[:4], res[1]["exact_off"]["outputs"][:4])]
    report["summary"]["v_cache_q8_0_vs_f16"] = kv_quality(gguf, answers, args.threads)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report["summary"], indent=1), flush=True)
    write_report(report, args.out)


def print_block(c: int, res: dict) -> None:
    for name, v in res.items():
        extra = f" trees {v['tree_choices']}" if v.get("tree_choices") else ""
        print(f"c={c:<2} {name:22s} {v['tokens_per_s']:7.1f} tok/s ({v['tokens']} tokens, {v['seconds']:.1f} s)"
              f"{extra}", flush=True)


if __name__ == "__main__":
    main()
