"""`python -m nbkit bench`: closed-loop load on the engine, side by side, with a JSON and a PNG.

N client threads each send a request, wait for its answer, and send the next, over a fixed prompt
set, until the configuration has served its requests. Every configuration runs in the same process
on the same loaded model, one after the other, so their ratios are comparable on a noisy machine.

Configurations: concurrency (1, 4, 16 by default) x speculation (off, fixed full tree, adaptive),
and a mixed-length workload (max_tokens 16..256) served by continuous and by static batching.
`--prompts` picks the prompt source(s) (nbkit.medusa.prompts: templates, handwritten, the public
held-out sets); each source gets its own concurrency x speculation grid and adaptive/off ratios.
Static batching is the design this project started from: take what is queued, pad it into one
batch, compute every row until the longest request is done, only then take new work (a finished
row stays in the batch as padding; its answer is still returned as soon as it is complete).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..chat_format import prompt_ids, user_prompt_ids
from ..engine.engine import Engine
from ..engine.request import SamplingParams
from ..medusa.prompts import held_out_prompts, parse_source_list
from .static import StaticAdmission


@dataclass
class RunResult:
    name: str
    concurrency: int
    speculation: str
    batching: str
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    latency_p50: float
    latency_p95: float
    mean_accepted: float  # tokens per decoding step, per request, averaged over requests
    tree_choices: dict = field(default_factory=dict)
    guard_backoffs: int = 0  # times the speculation guard found speculation losing and stopped it
    remeasurements: int = 0  # cost-model re-measurements after step times drifted
    round_tokens_per_s: list = field(default_factory=list)  # per interleaved round (for per-round ratios)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def closed_loop(engine: Engine, prompts: list[list[int]], concurrency: int, n_requests: int,
                max_tokens: list[int], first: int = 0) -> tuple[list, float]:
    """Run `n_requests` requests with `concurrency` clients, from prompt number `first` on; returns
    (Finished list, wall seconds)."""
    lock = threading.Lock()
    next_i = [first]
    n_requests += first
    results = []

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            out = engine.submit(prompts[i % len(prompts)],
                                SamplingParams(max_tokens=max_tokens[i % len(max_tokens)])).result()
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summarize(name, concurrency, speculation, batching, results, seconds, engine, choices=None) -> RunResult:
    tokens = sum(r.completion_tokens for r in results)
    errors = [r for r in results if r.finish_reason in ("error", "cancelled")]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed: {errors[0].error}")
    ttft = [r.time_to_first_token for r in results if r.time_to_first_token is not None]
    lat = [r.latency for r in results]
    return RunResult(
        name=name, concurrency=concurrency, speculation=speculation, batching=batching, requests=len(results),
        output_tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 2),
        ttft_p50=round(_pct(ttft, 0.5), 4), ttft_p95=round(_pct(ttft, 0.95), 4),
        latency_p50=round(_pct(lat, 0.5), 4), latency_p95=round(_pct(lat, 0.95), 4),
        mean_accepted=round(statistics.mean(r.mean_accepted for r in results if r.steps) if results else 0, 3),
        tree_choices=dict(engine.speculation.choices if choices is None else choices),
    )


def bench_prompts(tokenizer, n: int = 32, chat: bool = True, source: str = "templates") -> list[list[int]]:
    """`n` held-out prompts of a prompt source (never used to train the shipped heads), chat-formatted."""
    picked = held_out_prompts(source, n)
    if not picked:
        raise ValueError(f"prompt source {source!r} has no held-out prompts")
    if not chat:
        return [prompt_ids(tokenizer, p) for p in picked]
    return [user_prompt_ids(tokenizer, p) for p in picked]


def run_bench(make_engine, tokenizer, concurrencies=(1, 4, 16), speculations=("off", "mc_sim_7b_63", "adaptive"),
              max_tokens: int = 64, requests_per_client: int = 2, min_requests: int = 8, mixed: bool = True,
              mixed_requests: int = 32, mixed_concurrency: int = 16, seed: int = 0, log=print,
              source: str = "templates", n_prompts: int = 32, warm_up: bool = True, rounds: int = 2) -> dict:
    """make_engine(speculation=..., static_batching=..., max_batch=...) -> a started Engine."""
    prompts = bench_prompts(tokenizer, n_prompts, source=source)
    runs: list[RunResult] = []
    if warm_up:  # first-call allocations, oneDNN/CUDA kernels: so the first config is not penalised
        warm = make_engine(speculation="off", static_batching=False, max_batch=max(concurrencies))
        closed_loop(warm, prompts, 2, 2, [8])
        warm.stop()
    for c in concurrencies:
        n = max(min_requests, requests_per_client * c)
        for run in interleaved(make_engine, prompts, c, n, speculations, max_tokens, rounds):
            runs.append(run)
            log(f"{source:>12} {run.name:>16}: {run.tokens_per_s:7.1f} tok/s  ttft p50 {run.ttft_p50:.3f}s  "
                f"latency p50 {run.latency_p50:.2f}s p95 {run.latency_p95:.2f}s  accepted/step {run.mean_accepted:.2f}"
                f"  trees {run.tree_choices}  guard back-offs {run.guard_backoffs}, re-measured {run.remeasurements}")
    if mixed:
        rng = random.Random(seed)
        lengths = [rng.choice([16, 32, 64, 128, 256]) for _ in range(mixed_requests)]
        for batching in ("static", "continuous"):
            engine = make_engine(speculation="off", static_batching=batching == "static", max_batch=mixed_concurrency)
            results, seconds = closed_loop(engine, prompts, mixed_concurrency, mixed_requests, lengths)
            run = summarize(f"mixed-{batching}", mixed_concurrency, "off", batching, results, seconds, engine)
            engine.stop()
            runs.append(run)
            log(f"{run.name:>22}: {run.tokens_per_s:7.1f} tok/s  ttft p50 {run.ttft_p50:.3f}s  "
                f"latency p50 {run.latency_p50:.2f}s p95 {run.latency_p95:.2f}s")
    return {"prompts": source, "runs": [asdict(r) for r in runs], "ratios": ratios(runs)}


def interleaved(make_engine, prompts: list[list[int]], concurrency: int, n_requests: int, speculations,
                max_tokens: int, rounds: int) -> list[RunResult]:
    """One RunResult per speculation setting over `n_requests`, served in `rounds` interleaved rounds (off,
    adaptive, off, adaptive... with the order reversed every other round, each round on the same prompts
    for every setting): a burst of load elsewhere on a shared machine then hits both sides alike."""
    rounds = max(1, min(rounds, n_requests))
    served: dict[str, list] = {s: [] for s in speculations}
    seconds = dict.fromkeys(speculations, 0.0)
    per_round: dict[str, list[float]] = {s: [] for s in speculations}
    choices: dict[str, dict] = {s: {} for s in speculations}
    checks = {s: {"guard_backoffs": 0, "remeasurements": 0} for s in speculations}
    first = 0
    for rnd in range(rounds):
        n = n_requests // rounds + (rnd < n_requests % rounds)
        for spec in speculations if rnd % 2 == 0 else list(reversed(speculations)):
            engine = make_engine(speculation=spec, static_batching=False, max_batch=max(concurrency, 1))
            results, took = closed_loop(engine, prompts, concurrency, n, [max_tokens], first=first)
            engine.stop()
            served[spec] += results
            seconds[spec] += took
            per_round[spec].append(round(sum(r.completion_tokens for r in results) / took, 2))
            for tree, k in engine.speculation.choices.items():
                choices[spec][tree] = choices[spec].get(tree, 0) + k
            for key, v in engine.speculation.policy.snapshot().items():
                if key in checks[spec]:
                    checks[spec][key] += v
        first += n
    runs = [summarize(f"c{concurrency}-{s}", concurrency, s, "continuous", served[s], seconds[s], None, choices[s])
            for s in speculations]
    for run in runs:
        run.guard_backoffs, run.remeasurements = checks[run.speculation]["guard_backoffs"], \
            checks[run.speculation]["remeasurements"]
        run.round_tokens_per_s = per_round[run.speculation]
    return runs


def run_sources(make_engine, tokenizer, sources: list[str], log=print, **kwargs) -> dict:
    """run_bench once per prompt source, side by side on the same engine factory.

    The first source's result stays at the top level (runs, ratios: what bench.json always held); every
    source's is under by_source, and per_source sums up speculation/off per concurrency for each source.
    The mixed-length workload (speculation off) runs once, with the first source.
    """
    by_source = {}
    for i, source in enumerate(sources):
        first = i == 0
        by_source[source] = run_bench(make_engine, tokenizer, log=log, source=source, warm_up=first,
                                      **{**kwargs, "mixed": kwargs.get("mixed", True) and first})
    result = dict(by_source[sources[0]])
    result["by_source"] = by_source
    result["per_source"] = {s: {k: v for k, v in r["ratios"].items() if "_over_off_c" in k}
                            for s, r in by_source.items()}
    return result


def ratios(runs: list[RunResult]) -> dict:
    by = {r.name: r for r in runs}
    out = {}
    cs = sorted({r.concurrency for r in runs if r.batching == "continuous" and not r.name.startswith("mixed")})
    if "c1-off" in by and cs:
        top = cs[-1]
        if f"c{top}-off" in by:
            out[f"off_c{top}_over_c1"] = round(by[f"c{top}-off"].tokens_per_s / by["c1-off"].tokens_per_s, 3)
    for c in cs:
        base = by.get(f"c{c}-off")
        for name in (f"c{c}-adaptive", f"c{c}-mc_sim_7b_63"):
            if base and name in by:
                out[f"{name.split('-', 1)[1]}_over_off_c{c}"] = round(by[name].tokens_per_s / base.tokens_per_s, 3)
                pairs = list(zip(by[name].round_tokens_per_s, base.round_tokens_per_s))
                if len(pairs) > 1:  # each round ran both back to back on the same prompts: robust to drift
                    out[f"{name.split('-', 1)[1]}_over_off_c{c}_round_median"] = round(
                        statistics.median(a / b for a, b in pairs), 3)
    if "mixed-static" in by and "mixed-continuous" in by:
        s, c = by["mixed-static"], by["mixed-continuous"]
        out["continuous_over_static_throughput"] = round(c.tokens_per_s / s.tokens_per_s, 3)
        out["continuous_over_static_latency_p50"] = round(c.latency_p50 / s.latency_p50, 3)
    return out


def plot(result: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["batching"] == "continuous" and not r["name"].startswith("mixed")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    specs = sorted({r["speculation"] for r in runs}, key=["off", "mc_sim_7b_63", "adaptive"].index
                   if all(s in ("off", "mc_sim_7b_63", "adaptive") for s in {r["speculation"] for r in runs})
                   else str)
    for spec in specs:
        rs = sorted((r for r in runs if r["speculation"] == spec), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rs]
        axes[0].plot(xs, [r["tokens_per_s"] for r in rs], marker="o", label=spec)
        axes[1].plot(xs, [r["latency_p50"] for r in rs], marker="o", label=spec)
    for ax, label in zip(axes[:2], ("total output tokens/s", "request latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    mixed = [r for r in result["runs"] if r["name"].startswith("mixed")]
    if mixed:
        names = [r["batching"] for r in mixed]
        axes[2].bar([f"{n}\ntok/s" for n in names], [r["tokens_per_s"] for r in mixed], color=["#999", "#2a7"])
        axes[2].set_title("mixed max_tokens 16-256")
        ax2 = axes[2].twinx()
        ax2.plot([f"{n}\ntok/s" for n in names], [r["latency_p50"] for r in mixed], "ko-", label="latency p50 (s)")
        ax2.set_ylabel("latency p50 (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import os

    name = platform.processor() or platform.machine()
    try:  # the CPU's model name says more than its architecture (an AMX Xeon and an AVX2 EPYC differ 4x here)
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} CPU x{os.cpu_count()}"


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="closed-loop benchmark: concurrency x speculation, continuous vs static")
    p.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--speculation", default="off,mc_sim_7b_63,adaptive")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--no-mixed", action="store_true")
    p.add_argument("--mixed-requests", type=int, default=32)
    p.add_argument("--prompts", default="templates",
                   help="prompt source(s), comma-separated, or 'all': templates, handwritten, selfinstruct_seed, "
                        "user_oriented, dolly (public ones are read from $NBKIT_PROMPTS_DIR: docs/bench/sources.md)")
    p.add_argument("--n-prompts", type=int, default=32, help="held-out prompts per source")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds per concurrency (off, adaptive, adaptive, off, ...): noise hits both")
    p.add_argument("--out", default="bench-out")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import torch

    from ..engine.loader import load_engine
    try:
        sources = parse_source_list(args.prompts)
        for source in sources:  # fail before loading the model when a source's file is missing
            held_out_prompts(source, 1)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"nbkit bench: {err}")
        return 2
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    top = max(concurrencies + [16])
    proto = load_engine(args.engine, args.model, args.heads, args.device, max_batch=top, speculation="adaptive")
    proto.start().stop()  # one calibration, in an engine thread, shared by every configuration

    def make_engine(speculation, static_batching, max_batch):
        if proto.heads is None and speculation != "off":
            speculation = "off"
        runner = proto.runner.fresh(max_slots=max_batch)
        return Engine(runner, proto.tokenizer, proto.heads, speculation=speculation, max_batch=max_batch,
                      cost_model=proto.speculation.cost_model, max_queue=1024, model_name=proto.model_name,
                      admission=StaticAdmission() if static_batching else None).start()

    torch.manual_seed(0)
    result = run_sources(make_engine, proto.tokenizer, sources, concurrencies=concurrencies,
                         speculations=args.speculation.split(","), max_tokens=args.max_tokens,
                         requests_per_client=args.requests_per_client, min_requests=args.min_requests,
                         mixed=not args.no_mixed, mixed_requests=args.mixed_requests, n_prompts=args.n_prompts,
                         rounds=args.rounds)
    result.update(run_metadata(args, proto))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"nbkit {args.engine} engine, {proto.model_name}, {result['machine']}"
    png = plot(result, out / "bench.png", f"{title}, prompts: {sources[0]}")
    for source in sources[1:]:
        plot(result["by_source"][source], out / f"bench-{source}.png", f"{title}, prompts: {source}")
    print(source_table(result))
    print(f"wrote {out / 'bench.json'} and {png}")
    return 0


def run_metadata(args, proto) -> dict:
    """What a reader of bench.json needs to reproduce it: machine, commit, heads, every setting."""
    import subprocess

    import torch

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    heads = getattr(proto.heads, "config", None) or {}
    return {
        "machine": machine_name(), "engine": args.engine, "model": proto.model_name,
        "commit": git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "heads": {k: heads[k] for k in ("medusa_num_heads", "medusa_num_layers", "trained_by", "train_answers",
                                         "top1_accuracy") if k in heads},
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "command": "python -m nbkit bench " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if k not in ("func", "command") and v not in (None, False)),
    }


def source_table(result: dict) -> str:
    """Markdown: one row per prompt source, speculation/off per concurrency (the figures issue 14 floors)."""
    per = result.get("per_source") or {result.get("prompts", "?"): {k: v for k, v in result["ratios"].items()
                                                                   if "_over_off_c" in k}}
    def order(key: str) -> tuple:
        spec, rest = key.split("_over_off_c")
        concurrency, _, suffix = rest.partition("_")
        return spec, suffix, int(concurrency)

    keys = sorted({k for r in per.values() for k in r}, key=order)
    head = "| source | " + " | ".join(k.replace("_over_off_c", "/off c").replace("_round_median", " (round median)")
                                     for k in keys) + " |"
    rows = [head, "|" + " --- |" * (len(keys) + 1)]
    for source, r in per.items():
        rows.append(f"| {source} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")
    return "\n".join(rows)
