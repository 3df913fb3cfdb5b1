"""`python -m nbkit.bench.ab`: `python -m nbkit bench` of two checkouts, alternated, compared by ratios.

A code change that should not change speed (a restructuring) is judged by running the same benchmark
on the code before and after it, on the same machine, in one sitting. One pair of runs is not enough on
a noisy machine, so the two checkouts alternate in ABBA order (before, after, after, before, ...), which
cancels a slow drift of the machine, and every configuration's after/before throughput ratio is the
median over the pairs. The bench's own ratios (adaptive/off, ...) are reported per checkout as medians.

    python -m nbkit.bench.ab --before ../old --after . --rounds 4 --out docs/bench/ab -- --no-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_bench(checkout: Path, bench_args: list[str]) -> dict:
    """One `python -m nbkit bench` run with `checkout` first on the import path; its bench.json."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        cmd = [sys.executable, "-m", "nbkit", "bench", *bench_args, "--out", out]
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "bench.json").read_text())


def abba_order(rounds: int) -> list[str]:
    """before/after labels in ABBA order: each round has one of each, and the order flips every round."""
    pairs = [("before", "after") if r % 2 == 0 else ("after", "before") for r in range(rounds)]
    return [label for pair in pairs for label in pair]


def throughput(result: dict) -> dict[str, float]:
    return {r["name"]: r["tokens_per_s"] for r in result["runs"]}


def compare(results: dict[str, list[dict]]) -> dict:
    """Per configuration: median tok/s per checkout and the median of the per-round after/before ratios;
    per bench ratio (adaptive/off, ...): the median per checkout and after/before."""
    before = [throughput(r) for r in results["before"]]
    after = [throughput(r) for r in results["after"]]
    names = [n for n in before[0] if all(n in t for t in before + after)]
    configs = {}
    for n in names:
        ratios = [a[n] / b[n] for a, b in zip(after, before) if b[n] > 0]
        configs[n] = {"before_tok_s": statistics.median(b[n] for b in before),
                      "after_tok_s": statistics.median(a[n] for a in after),
                      "after_over_before": round(statistics.median(ratios), 3),
                      "per_round": [round(x, 3) for x in ratios]}
    bench_ratios = {}
    for key in results["before"][0].get("ratios", {}):
        b = statistics.median(r["ratios"][key] for r in results["before"])
        a = statistics.median(r["ratios"].get(key, float("nan")) for r in results["after"])
        bench_ratios[key] = {"before": round(b, 3), "after": round(a, 3), "after_over_before": round(a / b, 3)}
    return {"configs": configs, "bench_ratios": bench_ratios}


def table(summary: dict) -> str:
    lines = ["| configuration | before tok/s | after tok/s | after/before (median of rounds) | per round |",
             "|---|---|---|---|---|"]
    for n, c in summary["configs"].items():
        lines.append(f"| {n} | {c['before_tok_s']:.1f} | {c['after_tok_s']:.1f} | **{c['after_over_before']:.3f}** "
                     f"| {', '.join(f'{x:.3f}' for x in c['per_round'])} |")
    lines += ["", "| bench ratio | before | after | after/before |", "|---|---|---|---|"]
    for k, r in summary["bench_ratios"].items():
        lines.append(f"| {k} | {r['before']:.3f} | {r['after']:.3f} | {r['after_over_before']:.3f} |")
    return "\n".join(lines)


def git_head(checkout: Path) -> str:
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m nbkit.bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, type=Path, help="checkout of the code before the change")
    p.add_argument("--after", required=True, type=Path, help="checkout of the code after the change")
    p.add_argument("--rounds", type=int, default=4, help="pairs of runs (ABBA order)")
    p.add_argument("--out", type=Path, default=Path("bench-ab"))
    args = p.parse_args(ours)
    for c in (args.before, args.after):
        if not (c / "nbkit" / "__main__.py").exists():
            p.error(f"{c} is not an nbkit checkout (no nbkit/__main__.py)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    results: dict[str, list[dict]] = {"before": [], "after": []}
    t0 = time.time()
    for i, label in enumerate(abba_order(args.rounds)):
        print(f"[{i + 1}/{2 * args.rounds}] {label} ({time.time() - t0:.0f} s)", flush=True)
        results[label].append(run_bench(getattr(args, label), bench_args))
    summary = {"before": git_head(args.before), "after": git_head(args.after), "rounds": args.rounds,
               "bench_args": bench_args, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_average": os.getloadavg(), **compare(results), "raw": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    print(f"wrote {args.out / 'ab.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
