"""Time to first token of a 6-turn conversation's turns, with and without prefix reuse, on both engines.

Each turn's prompt is the whole conversation so far (the chat template over every message), as a chat client
sends it; without reuse the sixth turn prefills all of it, with reuse only the new question. Speculation is off:
the first token comes from the prefill either way, and the policy's start-up calibration is not timed. The questions are
the held-out "handwritten" prompts (never used to train the shipped heads). Both settings run in the same
process, alternating round by round; the figure per turn is the median over the rounds.

    PYTHONPATH=. python scripts/prefix_ttft.py --rounds 3 --max-tokens 48 --out docs/bench/prefix_ttft.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

from nbkit.chat_format import chat_prompt_ids
from nbkit.engine.loader import load_engine
from nbkit.engine.request import SamplingParams
from nbkit.medusa.prompts import held_out_prompts


def conversation(engine, questions: list[str], params: SamplingParams) -> list[dict]:
    """One conversation from a cold cache: per turn, its prompt length, reused tokens and TTFT (seconds)."""
    engine.prefix.clear(engine)
    messages, turns = [], []
    for q in questions:
        messages.append({"role": "user", "content": q})
        ids = chat_prompt_ids(engine.tokenizer, messages)
        fin = engine.generate(ids, params)
        turns.append({"prompt_tokens": len(ids), "cached_tokens": fin.cached_tokens, "ttft": fin.time_to_first_token})
        messages.append({"role": "assistant", "content": fin.text})
    return turns


def measure(kind: str, questions: list[str], rounds: int, max_tokens: int) -> dict:
    engines = {on: load_engine(kind, None, max_batch=4, prefix_cache=on, self_check=False, speculation="off")
               for on in (True, False)}
    params = SamplingParams(max_tokens=max_tokens)  # greedy, as the README's examples
    for e in engines.values():  # first-call allocations and kernels, outside the timed turns
        e.generate(chat_prompt_ids(e.tokenizer, [{"role": "user", "content": "Hello!"}]), params)
    runs: dict[bool, list[list[dict]]] = {True: [], False: []}
    for _ in range(rounds):
        for on, e in engines.items():
            runs[on].append(conversation(e, questions, params))
    out = {}
    for on, rs in runs.items():
        ttft = [statistics.median(r[t]["ttft"] for r in rs) for t in range(len(questions))]
        out["reuse" if on else "no_reuse"] = {
            "ttft_s": [round(x, 4) for x in ttft], "prompt_tokens": [t["prompt_tokens"] for t in rs[0]],
            "cached_tokens": [t["cached_tokens"] for t in rs[0]], "last_over_first": round(ttft[-1] / ttft[0], 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="torch,llamacpp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    questions = held_out_prompts("handwritten", args.turns)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "turns": args.turns,
              "rounds": args.rounds, "max_tokens": args.max_tokens}
    for kind in args.engines.split(","):
        result[kind] = measure(kind, questions, args.rounds, args.max_tokens)
        for name, r in result[kind].items():
            print(f"{kind:>8} {name:>8}: TTFT per turn {r['ttft_s']} s  turn {args.turns}/turn 1 "
                  f"{r['last_over_first']}x  prompt {r['prompt_tokens']}  reused {r['cached_tokens']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
