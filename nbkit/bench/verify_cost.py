"""What one verification step costs as a function of its tokens: the curve that decides whether a tree can pay.

    python -m nbkit.bench.verify_cost [--engine torch|llamacpp] [--max-batch 16] [--repeats 7] [--out FILE]

Runs the engine's own start-up calibration (`calibration.calibrate`: every shape timed in interleaved rounds,
median per shape) on the embedded model and shipped heads, and prints each shape's time over a plain
one-token step (for a full batch, over the plain full batch). That ratio is the break-even: a tree of T
tokens pays only if it yields more than cost(T) / cost(1) tokens per step, and the shipped heads yield
about 1.7 on prompts nobody tuned for (docs/bench/policy.md). On a GPU, where 64 tokens cost about as
much as one, the ratios stay near 1; on a CPU whose small matrix products cost twice a vector product, no
tree can pay and the adaptive policy's job is to lose nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from . import report_json
from .closed_loop import machine_name


def curve(engine: str, max_batch: int, repeats: int, threads: int) -> dict:
    from ..engine.loader import load_engine
    from ..engine.speculation.calibration import calibrate

    kwargs = {"n_threads": threads} if engine == "llamacpp" else {}
    eng = load_engine(engine, None, heads="embedded", max_batch=max_batch, speculation="off", **kwargs)
    model = calibrate(eng.runner, eng.heads, max_batch, max_tree=eng.base_tree.size, repeats=repeats)
    plain_row = model.points[1]
    plain_batch = model.measured.get((max_batch, 1), plain_row)
    return {
        "one_row_ms": {n: round(1000 * s, 2) for n, s in model.points.items()},
        "one_row_over_plain": {n: round(s / plain_row, 2) for n, s in model.points.items()},
        "full_batch_over_plain": {f"{rows}x{t}": round(s / plain_batch, 2)
                                  for (rows, t), s in sorted(model.measured.items()) if rows == max_batch},
        "heads_ms": {rows: round(1000 * s, 2) for rows, s in model.heads_points.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch / ggml threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["NBKIT_LLAMA_THREADS"] = str(args.threads)
    result = {"command": "python -m nbkit.bench.verify_cost " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                   for k, v in vars(args).items() if v is not None),
              "machine": machine_name(), "threads": args.threads,
              "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_before": os.getloadavg(), **curve(args.engine, args.max_batch, args.repeats, args.threads)}
    report_json(result, args.out)


if __name__ == "__main__":
    main()
