"""Mean accepted tokens per step on ALL held-out prompts, by real greedy decoding with one tree.

    python scripts/acceptance_heldout.py [--tree mc_sim_7b_63] [--max-tokens 128] [--concurrency 16]

Tokens per step counts the bonus token (plain decoding = 1.0): decoded tokens / verification steps,
over every step of every request (the first token, which comes from the prefill, is not counted).
Acceptance does not depend on batching, so the prompts run 16 at a time. Reported for the 120
held-out template prompts, the 8 hand-written ones (no template overlap), and all 128. Every output
is checked against plain greedy decoding in the same batch run.
"""

from __future__ import annotations

import argparse
import json

from nbkit.engine.engine import Engine
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.medusa.prompts import EXTRA_EVAL_PROMPTS, distill_prompts


def run(engine: Engine, ids: list[list[int]], max_tokens: int) -> list:
    engine.start()
    try:
        handles = [engine.submit(x, SamplingParams(max_tokens=max_tokens)) for x in ids]
        return [h.result() for h in handles]
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = load_engine("torch", max_batch=args.concurrency, speculation=args.tree, max_queue=1024)
    plain = Engine(engine.runner.fresh(), engine.tokenizer, None, speculation="off", max_queue=1024)
    _, held_out = distill_prompts()
    ids = [engine.encode(p, chat=True) for p in held_out]
    medusa = run(engine, ids, args.max_tokens)
    reference = run(plain, ids, args.max_tokens)
    groups = {"template": [i for i, p in enumerate(held_out) if p not in EXTRA_EVAL_PROMPTS],
              "hand-written": [i for i, p in enumerate(held_out) if p in EXTRA_EVAL_PROMPTS],
              "all": list(range(len(held_out)))}
    result = {"tree": args.tree, "max_tokens": args.max_tokens, "heads": engine.heads.config.get("trained_by"),
              "outputs_differing_from_plain": sum(m.token_ids != r.token_ids for m, r in zip(medusa, reference))}
    for name, idx in groups.items():
        steps = sum(medusa[i].steps for i in idx)
        tokens = sum(medusa[i].accepted_tokens for i in idx)
        result[name] = {"prompts": len(idx), "steps": steps, "tokens": tokens,
                        "accepted_per_step": round(tokens / max(steps, 1), 3)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
