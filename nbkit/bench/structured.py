"""Structured-output speed: speculation off / adaptive / adaptive + jump-forward, side by side in one run.

    python -m nbkit.bench.structured [--engine torch|llamacpp] [--tokens 64] [--rounds 2]

Schemas and prompts were not tuned on: the schemas are the JSON schemas of this server's own response bodies
(its OpenAPI document: answers, usage counts, model cards, health, ...; those whose keywords the grammar
enforces), the prompts the held-out `handwritten` source, each asked to answer as JSON; prompt i gets schema
i mod k. Every (prompt, schema) pair runs under each configuration back to back on one engine, so machine
noise hits them alike; tok/s = generated tokens / seconds of the steps that produced them. Greedy: the three
answers to a pair must be equal (the grammar makes speculation and jump-forward change the speed only).
"""

from __future__ import annotations

import argparse
import json
import time

from nbkit.chat_format import user_prompt_ids
from nbkit.engine.request import GrammarKind, GrammarSpec, SamplingParams
from nbkit.engine.schema_check import check_schema
from nbkit.medusa.prompts import held_out_prompts

CONFIGS = {  # name -> (speculate, jump_forward)
    "off": (False, False),
    "adaptive": (True, False),
    "adaptive+jump-forward": (True, True),
    "off+jump-forward": (False, True),
}


def api_schemas() -> list[tuple[str, str]]:
    """(name, schema JSON) of the server's response bodies that hold no reference and only enforced keywords."""
    from nbkit.server.app import create_app

    found = []
    for name, schema in create_app().openapi()["components"]["schemas"].items():
        text = json.dumps(schema, sort_keys=True)
        if "$ref" in text or schema.get("type") != "object":
            continue
        try:
            check_schema(schema)
        except ValueError:
            continue
        found.append((name, text))
    return found


def run_one(engine, ids: list[int], spec: GrammarSpec, speculate: bool, jump: bool, tokens: int):
    """(token ids, seconds) of one greedy constrained request run alone."""
    engine.grammar.jump_forward = jump
    handle = engine.submit(ids, SamplingParams(max_tokens=tokens, grammar=spec, speculate=speculate))
    t0 = time.perf_counter()
    while not handle.finished:
        engine.step()
    return handle.result(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch

    from nbkit.engine.loader import load_engine

    torch.set_num_threads(1)
    engine = load_engine(args.engine, heads="embedded", max_batch=1, self_check=False)
    schemas = api_schemas()
    prompts = held_out_prompts("handwritten")
    pairs = [(p, schemas[i % len(schemas)]) for i, p in enumerate(prompts)]
    for _, (_, schema) in pairs:
        engine.compile_grammar(GrammarSpec(GrammarKind.JSON_SCHEMA, schema))
    totals = {name: [0, 0.0] for name in CONFIGS}
    steps = {name: 0 for name in CONFIGS}
    mismatches = 0
    run_one(engine, user_prompt_ids(engine.tokenizer, "Hi"), GrammarSpec(GrammarKind.JSON_OBJECT), True, True, 8)
    for _ in range(args.rounds):
        for prompt, (_, schema) in pairs:
            ids = user_prompt_ids(engine.tokenizer, prompt + " Answer with a JSON object.")
            spec = GrammarSpec(GrammarKind.JSON_SCHEMA, schema)
            answers = set()
            for name, (speculate, jump) in CONFIGS.items():
                fin, seconds = run_one(engine, ids, spec, speculate, jump, args.tokens)
                totals[name][0] += fin.completion_tokens
                totals[name][1] += seconds
                steps[name] += fin.steps
                answers.add(tuple(fin.token_ids))
            mismatches += len(answers) > 1
    tok_s = {name: n / s for name, (n, s) in totals.items()}
    report = {
        "engine": args.engine, "schemas": [n for n, _ in schemas], "prompts": "handwritten", "pairs": len(pairs),
        "rounds": args.rounds, "max_tokens": args.tokens,
        "tok_s": {k: round(v, 2) for k, v in tok_s.items()},
        "tokens_per_step": {k: round(totals[k][0] / max(steps[k], 1), 3) for k in CONFIGS},
        "ratio_vs_off": {k: round(v / tok_s["off"], 3) for k, v in tok_s.items()},
        "greedy_answers_differing": mismatches,
    }
    print(json.dumps(report, indent=2))
    print("  ".join(f"{k}: {v:.1f} tok/s ({report['ratio_vs_off'][k]:.2f}x)" for k, v in tok_s.items()))


if __name__ == "__main__":
    main()
