"""Per prompt source: mean accepted tokens per step (real greedy decoding with one tree) and head top-1/top-10.

    python scripts/acceptance_heldout.py [--prompts templates,handwritten,user_oriented] [--n-prompts N]
        [--tree mc_sim_7b_63] [--max-tokens 128] [--concurrency 16] [--heads DIR[,DIR...]] [--out FILE]

Tokens per step counts the bonus token (plain decoding = 1.0): decoded tokens / verification steps,
over every step of every request (the first token, which comes from the prefill, is not counted).
Acceptance does not depend on batching, so the prompts run `--concurrency` at a time. Every output is
checked against plain greedy decoding in the same run. Head top-1/top-10 are measured on the plain greedy
answers (the tokens greedy verification compares against), as `train-heads` measures them on its eval set.
With several `--heads`, every heads folder is measured on the same prompts and the same plain reference.
Sources are those of nbkit.medusa.prompts; the public ones are read from $NBKIT_PROMPTS_DIR
(docs/bench/sources.md), and only their held-out side is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from nbkit.engine.engine import Engine
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.medusa.heads import embedded_heads_dir, load_heads
from nbkit.medusa.prompts import held_out_prompts, parse_source_list
from nbkit.medusa.train import acceptance_table, compute_features


def run(engine: Engine, ids: list[list[int]], max_tokens: int) -> list:
    engine.start()
    try:
        handles = [engine.submit(x, SamplingParams(max_tokens=max_tokens)) for x in ids]
        return [h.result() for h in handles]
    finally:
        engine.stop()


def measure(engine: Engine, plain: Engine, model, ids: list[list[int]], max_tokens: int) -> dict:
    """Acceptance of `engine` (with a tree) and head accuracy on `ids`; `plain` (speculation off) is the reference."""
    return measure_heads({"heads": engine}, plain, model, ids, max_tokens)["heads"]


def measure_heads(engines: dict[str, Engine], plain: Engine, model, ids: list[list[int]], max_tokens: int,
                  ) -> dict[str, dict]:
    """`measure` for several engines (heads) on the same prompts: one plain reference and one features pass."""
    reference = run(plain, ids, max_tokens)
    answers = [(x, r.token_ids) for x, r in zip(ids, reference) if len(r.token_ids) > 1]
    with contextlib.redirect_stdout(sys.stderr):  # compute_features reports progress
        features = compute_features(model, answers)
    out = {}
    for label, engine in engines.items():
        medusa = run(engine, ids, max_tokens)
        steps = sum(m.steps for m in medusa)
        tokens = sum(m.accepted_tokens for m in medusa)
        table = acceptance_table(features, engine.heads, model.get_output_embeddings())
        out[label] = {
            "prompts": len(ids), "steps": steps, "tokens": tokens,
            "accepted_per_step": round(tokens / max(steps, 1), 3),
            "outputs_differing_from_plain": sum(m.token_ids != r.token_ids for m, r in zip(medusa, reference)),
            "head_top1": table["top1_accuracy"], "head_top10": table["top10_accuracy"], "positions": table["positions"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="templates,handwritten", help="prompt sources, comma-separated, or 'all'")
    ap.add_argument("--n-prompts", type=int, default=None, help="held-out prompts per source (default: all)")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--heads", default=None,
                    help="heads folders to compare, comma-separated (default: the shipped heads); 'embedded' = shipped")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        sources = {s: held_out_prompts(s, args.n_prompts) for s in parse_source_list(args.prompts)}
    except (ValueError, KeyError, FileNotFoundError) as err:
        sys.exit(f"acceptance_heldout: {err}")
    labels = [h.strip() for h in (args.heads or "embedded").split(",") if h.strip()]
    engine = load_engine("torch", heads=labels[0], max_batch=args.concurrency, speculation=args.tree, max_queue=1024)
    engines = {labels[0]: engine}
    for label in labels[1:]:
        where = embedded_heads_dir() if label == "embedded" else label
        heads = load_heads(where, engine.runner.model.config.hidden_size)
        engines[label] = Engine(engine.runner.fresh(), engine.tokenizer, heads, speculation=args.tree,
                                max_batch=args.concurrency, max_queue=1024)
    plain = Engine(engine.runner.fresh(), engine.tokenizer, None, speculation="off", max_queue=1024)
    result = {"tree": args.tree, "max_tokens": args.max_tokens,
              "heads": {label: e.heads.config.get("trained_by") for label, e in engines.items()},
              "command": "python scripts/acceptance_heldout.py " + " ".join(sys.argv[1:]), "sources": {}}
    for name, prompts in sources.items():
        ids = [engine.encode(p, chat=True) for p in prompts]
        by_heads = measure_heads(engines, plain, engine.runner.model, ids, args.max_tokens)
        result["sources"][name] = by_heads[labels[0]] if len(labels) == 1 else by_heads
        print(name, json.dumps(result["sources"][name]), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
