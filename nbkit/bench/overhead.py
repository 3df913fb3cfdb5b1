"""What the HTTP path adds to a request: the engine alone vs `POST /generate`, one request at a time.

    python -m nbkit.bench.overhead [--max-tokens 64] [--repeats 3] [--speculation off]

Both paths use the same started engine and the same prompts, interleaved (engine, HTTP, engine, ...)
so that a busy machine slows both alike. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the boiling point of water at sea level?",
]


def measure(max_tokens: int = 64, repeats: int = 3, speculation: str = "off", model=None, heads=None) -> dict:
    import httpx

    from ..engine.request import SamplingParams
    from ..server.launch import start_server

    params = SamplingParams(max_tokens=max_tokens)  # what POST /generate asks the engine for
    with start_server(model=model, heads=heads, port=0, max_batch=1, speculation=speculation) as handle, \
            httpx.Client(base_url=handle.url, timeout=300) as http:
        engine = handle.engine
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=4))  # warm-up
        http.post("/generate", json={"prompt": PROMPTS[0], "max_tokens": 4})
        direct, over_http, tokens = [], [], []
        for _ in range(repeats):
            for prompt in PROMPTS:
                t0 = time.perf_counter()
                out = engine.generate(prompt, params, chat=True)
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = http.post("/generate", json={"prompt": prompt, "max_tokens": max_tokens, "chat": True})
                over_http.append(time.perf_counter() - t0)
                tokens.append(out.completion_tokens)
                if r.json()["response"] != out.text:
                    raise AssertionError(f"the HTTP answer differs from the engine's for {prompt!r}")
    d, h = statistics.median(direct), statistics.median(over_http)
    return {"requests_per_path": len(direct), "max_tokens": max_tokens,
            "mean_completion_tokens": round(statistics.mean(tokens), 1), "speculation": speculation,
            "engine_median_s": round(d, 4), "http_median_s": round(h, 4), "overhead": round(h / d - 1, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbkit.bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speculation", default="off")
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.max_tokens, args.repeats, args.speculation, args.model, args.heads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
