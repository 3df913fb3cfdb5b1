"""Per prompt source: mean accepted tokens per step (real greedy decoding with one tree) and head top-1/top-10.

    python -m nbkit.bench.acceptance [--prompts templates,handwritten,user_oriented] [--n-prompts N]
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
from pathlib import Path

from nbkit.bench import report_json
from nbkit.engine.engine import Engine
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.medusa.heads import embedded_heads_dir, load_heads
from nbkit.medusa.prompts import held_out_prompts, parse_source_list
from nbkit.medusa.simulate import simulated_per_step
from nbkit.medusa.train import Features, acceptance_table, compute_features, load_features, save_features
from nbkit.medusa.trees import get_tree


def run(engine: Engine, ids: list[list[int]], max_tokens: int) -> list:
    engine.start()
    try:
        handles = [engine.submit(x, SamplingParams(max_tokens=max_tokens)) for x in ids]
        return [h.result() for h in handles]
    finally:
        engine.stop()


def measure(engine: Engine, plain: Engine, model, ids: list[list[int]], max_tokens: int) -> dict:
    """Acceptance of `engine` (with a tree) and head accuracy on `ids`; `plain` (speculation off) is the reference."""
    tree = engine.speculation.fixed.name if engine.speculation.fixed else "mc_sim_7b_63"
    return measure_heads({"heads": engine}, plain, model, ids, max_tokens, tree)["heads"]


def plain_reference(plain: Engine, model, ids: list[list[int]], max_tokens: int, cache: Path | None,
                    ) -> tuple[list[list[int]], Features]:
    """Plain greedy answers to `ids` and their features; kept in `cache` (a file stem) and reused when the
    same prompt ids come again (a later run comparing other heads skips the plain decoding)."""
    if cache is not None and cache.with_suffix(".json").is_file():
        saved = json.loads(cache.with_suffix(".json").read_text())
        if saved["ids"] == ids and saved["max_tokens"] == max_tokens:
            return saved["answers"], load_features(cache.with_suffix(".pt"))
    reference = [r.token_ids for r in run(plain, ids, max_tokens)]
    answers = [(x, r) for x, r in zip(ids, reference) if len(r) > 1]
    with contextlib.redirect_stdout(sys.stderr):  # compute_features reports progress
        features = compute_features(model, answers)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_features(features, cache.with_suffix(".pt"))
        cache.with_suffix(".json").write_text(json.dumps({"ids": ids, "max_tokens": max_tokens, "answers": reference}))
    return reference, features


def measure_heads(engines: dict[str, Engine], plain: Engine, model, ids: list[list[int]], max_tokens: int,
                  tree: str = "mc_sim_7b_63", simulate: bool = False, cache: Path | None = None) -> dict[str, dict]:
    """`measure` for several engines (heads) on the same prompts: one plain reference and one features pass.
    Every heads also gets `simulated_per_step` (nbkit.medusa.simulate, on the plain answers); with
    simulate=True the engine's own Medusa decoding (minutes per source on a CPU) is skipped."""
    reference, features = plain_reference(plain, model, ids, max_tokens, cache)
    out = {}
    for label, engine in engines.items():
        table = acceptance_table(features, engine.heads, model.get_output_embeddings())
        sim = simulated_per_step(features.hidden, features.next_tokens, features.seq_end, engine.heads,
                                 model.get_output_embeddings(), get_tree(tree, engine.heads.n_heads))
        out[label] = {"prompts": len(ids), "simulated_per_step": sim["per_step"], "head_top1": table["top1_accuracy"],
                      "head_top10": table["top10_accuracy"], "positions": table["positions"]}
        if not simulate:  # real greedy Medusa decoding in the engine, checked against plain greedy
            medusa = run(engine, ids, max_tokens)
            steps = sum(m.steps for m in medusa)
            tokens = sum(m.accepted_tokens for m in medusa)
            out[label].update(steps=steps, tokens=tokens, accepted_per_step=round(tokens / max(steps, 1), 3),
                              outputs_differing_from_plain=sum(m.token_ids != r
                                                               for m, r in zip(medusa, reference)))
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
    ap.add_argument("--simulate", action="store_true",
                    help="tokens/step only simulated on the plain answers (skip the engine's Medusa runs)")
    ap.add_argument("--reference-cache", default=None,
                    help="folder keeping each source's plain answers and features, reused by later runs")
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
              "command": "python -m nbkit.bench.acceptance " + " ".join(sys.argv[1:]), "sources": {}}
    for name, prompts in sources.items():
        ids = [engine.encode(p, chat=True) for p in prompts]
        cache = Path(args.reference_cache) / f"{name}-{len(ids)}" if args.reference_cache else None
        by_heads = measure_heads(engines, plain, engine.runner.model, ids, args.max_tokens, args.tree, args.simulate,
                                 cache)
        result["sources"][name] = by_heads[labels[0]] if len(labels) == 1 else by_heads
        print(name, json.dumps(result["sources"][name]), file=sys.stderr, flush=True)
    report_json(result, args.out)


if __name__ == "__main__":
    main()
