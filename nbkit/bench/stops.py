"""Per-token cost of stop strings: four 256-character stops vs none (issue 13's floor: within 10%).

    python -m nbkit.bench.stops [--tokens 512] [--repeats 3] [--stream-tokens 4000]

Two measurements, both on the embedded SmolLM2 tokenizer:
1. end to end: the embedded model on the torch engine, greedy, `ignore_eos`, the same prompt with no stop and
   with four 256-character stops that never match (each starts with a space, so the hold-back check runs at
   every word), interleaved so machine noise hits both alike; seconds per generated token, engine thread only;
2. the text stream alone (TextStream.update), microseconds per token over a long output, with and without the
   stops: the part of a step that stop strings can make dear, measured where nothing else hides it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time

from nbkit.engine.request import SamplingParams, TextStream


def stops(n: int = 4, length: int = 256, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" " + "".join(rng.choice(string.ascii_letters) for _ in range(length - 1)) for _ in range(n)]


def stream_cost(tokenizer, ids: list[int], stop: list[str]) -> float:
    """Microseconds per token of TextStream.update over the whole output."""
    ts = TextStream(tokenizer, stop)
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        ts.update(ids[:n])
    return (time.perf_counter() - t0) / len(ids) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512, help="tokens per end-to-end request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-tokens", type=int, default=4000, help="output length for the text-stream part")
    args = ap.parse_args()

    import torch

    from nbkit.engine.loader import load_engine

    torch.set_num_threads(1)
    engine = load_engine("torch", max_batch=1, speculation="off", self_check=False)
    prompt = engine.encode("Write a long story about a lighthouse keeper.", chat=True)
    long_stops = stops()
    per_token = {"none": [], "four_256": []}
    for _ in range(args.repeats):
        for name, stop in (("none", []), ("four_256", long_stops)):
            t0 = time.perf_counter()
            out = engine.generate(prompt, SamplingParams(max_tokens=args.tokens, stop=stop, ignore_eos=True))
            assert out.finish_reason == "length", out.finish_reason
            per_token[name].append((time.perf_counter() - t0) / out.completion_tokens)
    e2e = {k: statistics.median(v) for k, v in per_token.items()}

    rng = random.Random(1)
    words = [w for w in engine.tokenizer.get_vocab() if w.isalpha()][:5000]
    text = " ".join(rng.choice(words) for _ in range(args.stream_tokens))
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"][: args.stream_tokens]
    stream = {name: statistics.median(stream_cost(engine.tokenizer, ids, stop) for _ in range(3))
              for name, stop in (("none", []), ("four_256", long_stops))}
    report = {
        "end_to_end_ms_per_token": {k: round(v * 1e3, 3) for k, v in e2e.items()},
        "end_to_end_ratio": round(e2e["four_256"] / e2e["none"], 4),
        "text_stream_us_per_token": {k: round(v, 1) for k, v in stream.items()},
        "text_stream_tokens": len(ids),
        "tokens_per_request": args.tokens, "repeats": args.repeats,
    }
    print(json.dumps(report, indent=2))
    ok = report["end_to_end_ratio"] <= 1.10
    print(f"four 256-char stops cost {100 * (report['end_to_end_ratio'] - 1):+.1f}% per token: "
          f"{'within' if ok else 'OUTSIDE'} the 10% floor")


if __name__ == "__main__":
    main()
