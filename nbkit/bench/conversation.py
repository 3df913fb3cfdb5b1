"""Multi-turn chats over HTTP: time to first token per turn and throughput, prefix reuse on and off, nbkit's two
engines and llama-server with cache_prompt, side by side in one run.

    python -m nbkit.bench.conversation                     # 8 chats of 6 turns, torch, llamacpp, llama-server
    python -m nbkit.bench.conversation --quick --engines torch   # one chat, 8 tokens a turn: a smoke test

Every configuration is a server process (`python -m nbkit serve`, `llama-server`), all started first (one at a
time); each wave of chats is then served by every configuration in rotating order, so load from elsewhere hits
all of them alike.
A chat is 6 user turns chained from MT-Bench's two-turn questions (nbkit/bench/chats.py); each turn is a
streamed greedy /v1/chat/completions request with the whole history, the assistant's earlier answers included,
and a fixed max_tokens. Time to first token is measured by the client: request sent -> first non-empty text.
Without prefix reuse a turn's prompt is prefilled whole, so its first token comes later every turn; with reuse
only the new part is prefilled. "reuse on/off" needs `nbkit serve --no-prefix-cache`: where that switch is
missing the nbkit rows say "as is" and the turn6/turn1 target is reported as not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from ..client import DONE, asse_events
from . import servers as srv
from .chats import Chat, chain, read_questions
from .servers import Config, Engine, Reuse, Server

TARGET_RATIO = 1.5  # the 6th turn's time to first token at most this times the 1st's, with reuse on


@dataclass
class Turn:
    ttft: float  # s from sending the request to the first non-empty piece of text
    seconds: float  # s from sending the request to the end of the stream
    completion_tokens: int
    prompt_tokens: int | None  # as the server counts them (usage)
    cached_tokens: int | None  # prompt tokens the server says it reused (None: it does not say)
    text: str


def request_body(config: Config, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if config.engine is Engine.LLAMA_SERVER:
        body["cache_prompt"] = config.reuse is Reuse.ON
    return body


def _cached(usage: dict | None, timings: dict | None) -> int | None:
    """Reused prompt tokens: OpenAI's usage.prompt_tokens_details.cached_tokens, or llama-server's timings."""
    details = (usage or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        return details["cached_tokens"]
    return (timings or {}).get("cache_n")


async def chat_turn(http: httpx.AsyncClient, config: Config, messages: list[dict], max_tokens: int) -> Turn:
    """One streamed turn; raises RuntimeError on an HTTP error or an error event."""
    start = time.perf_counter()
    first, pieces, usage, timings = None, [], None, None
    async with http.stream("POST", "/v1/chat/completions", json=request_body(config, messages, max_tokens)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{config.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for event in asse_events(r.aiter_lines()):
            if event == DONE:
                break
            if "error" in event:
                raise RuntimeError(f"{config.name}: error event {json.dumps(event)[:300]}")
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                pieces.append(piece)
            usage, timings = event.get("usage") or usage, event.get("timings") or timings
    end = time.perf_counter()
    completion = usage["completion_tokens"] if usage else sum(bool(p) for p in pieces)
    return Turn(ttft=(first or end) - start, seconds=end - start, completion_tokens=completion,
                prompt_tokens=usage["prompt_tokens"] if usage else None, cached_tokens=_cached(usage, timings),
                text="".join(pieces))


async def run_chat(http: httpx.AsyncClient, config: Config, chat: Chat, max_tokens: int) -> list[Turn]:
    """The chat's user turns in order, each answer fed back as the assistant's message."""
    messages, turns = [], []
    for user in chat.turns:
        messages.append({"role": "user", "content": user})
        turn = await chat_turn(http, config, messages, max_tokens)
        messages.append({"role": "assistant", "content": turn.text})
        turns.append(turn)
    return turns


async def serve_wave(url: str, config: Config, chats: list[Chat], max_tokens: int,
                     timeout: float) -> tuple[list[list[Turn]], float]:
    """`chats` at once on one server (one client each); (their turns, wall seconds)."""
    limits = httpx.Limits(max_connections=len(chats), max_keepalive_connections=len(chats))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        turns = await asyncio.gather(*(run_chat(http, config, c, max_tokens) for c in chats))
        return list(turns), time.perf_counter() - start


def run_interleaved(servers: dict[Config, Server], chats: list[Chat], max_tokens: int, concurrency: int,
                    timeout: float, log=print) -> dict[Config, dict]:
    """Waves of `concurrency` chats; every wave served by every configuration, the order rotating."""
    configs = list(servers)
    done = {c: {"chats": [], "seconds": 0.0} for c in configs}
    for w, first in enumerate(range(0, len(chats), concurrency)):
        wave = chats[first: first + concurrency]
        for config in configs[w % len(configs):] + configs[: w % len(configs)]:
            turns, seconds = asyncio.run(serve_wave(servers[config].url, config, wave, max_tokens, timeout))
            done[config]["chats"] += turns
            done[config]["seconds"] += seconds
            log(f"  {config.name:28s} {', '.join(c.name for c in wave)}: first token "
                + " ".join(f"{t.ttft * 1000:.0f}" for t in turns[0]) + " ms")
    return done


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(chats: list[list[Turn]], seconds: float) -> dict:
    """Per turn (medians over chats): time to first token, prompt and reused tokens; the turn6/turn1 ratio of
    the medians; output tokens per second of wall time."""
    n_turns = min(len(c) for c in chats)
    per_turn = [[c[i] for c in chats] for i in range(n_turns)]
    ttft = [_median([t.ttft for t in turns]) for turns in per_turn]
    tokens = sum(t.completion_tokens for c in chats for t in c)
    return {
        "ttft_s": [round(v, 4) for v in ttft],
        "prompt_tokens": [_median([t.prompt_tokens for t in turns if t.prompt_tokens is not None])
                          for turns in per_turn],
        "cached_tokens": [_median([t.cached_tokens for t in turns if t.cached_tokens is not None])
                          for turns in per_turn],
        "last_over_first": round(ttft[-1] / ttft[0], 3) if ttft and ttft[0] else None,
        "output_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
        "chats": len(chats), "turns": n_turns,
    }


def differing_answers(a: list[list[Turn]], b: list[list[Turn]]) -> int:
    """Turns whose greedy answer differs between two configurations of one engine (reuse must not change it)."""
    return sum(x.text != y.text for ca, cb in zip(a, b) for x, y in zip(ca, cb))


def verdicts(summaries: dict[str, dict], switch: bool) -> dict[str, str]:
    """The target per nbkit engine: with reuse on, turn 6's time to first token <= 1.5x turn 1's."""
    out = {}
    for engine in (Engine.TORCH, Engine.LLAMACPP):
        on = summaries.get(Config(engine, Reuse.ON).name)
        if not switch and Config(engine, Reuse.AS_IS).name in summaries:
            out[engine.value] = ("not measured: this `nbkit serve` has no --no-prefix-cache switch, so there is "
                                 "no prefix reuse to turn on and off")
        elif on is not None and on["last_over_first"] is not None:
            ratio = on["last_over_first"]
            met = "met" if ratio <= TARGET_RATIO else "NOT met"
            out[engine.value] = f"{met}: {ratio:.2f} (target <= {TARGET_RATIO})"
    return out


def markdown(summaries: dict[str, dict], differing: dict[str, int]) -> str:
    """Configurations side by side: per turn the median time to first token (and the median prompt tokens,
    with the reused ones where the server reports them), then turn N/turn 1 and output tokens/s."""
    names = list(summaries)
    n_turns = min(s["turns"] for s in summaries.values())

    def cell(s: dict, i: int) -> str:
        cached = s["cached_tokens"][i]
        reused = f", {cached:.0f} reused" if cached is not None else ""
        prompt = f" ({s['prompt_tokens'][i]:.0f} tok{reused})" if s["prompt_tokens"][i] is not None else ""
        return f"{s['ttft_s'][i] * 1000:.0f} ms{prompt}"

    rows = [f"| turn | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| {i + 1} | " + " | ".join(cell(summaries[n], i) for n in names) + " |" for i in range(n_turns)]
    rows.append(f"| turn {n_turns} / turn 1 | " + " | ".join(
        f"{summaries[n]['last_over_first']:.2f}" if summaries[n]["last_over_first"] else "-" for n in names) + " |")
    rows.append("| output tok/s | " + " | ".join(f"{summaries[n]['tokens_per_s']:.1f}" for n in names) + " |")
    if differing:
        rows.append("| answers differing from reuse off | " + " | ".join(
            str(differing[n]) if n in differing else "-" for n in names) + " |")
    return "\n".join(rows)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nbkit.bench.conversation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engines", default="torch,llamacpp,llama-server", help="any of torch, llamacpp, llama-server")
    p.add_argument("--chats", type=int, default=None, help="chats to run (default 8; --quick: 1)")
    p.add_argument("--turns", type=int, default=6, help="user turns per chat")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 64; --quick: 8)")
    p.add_argument("--concurrency", type=int, default=1, help="chats at once on a server")
    p.add_argument("--quick", action="store_true", help="a smoke test: one chat, 8 tokens per answer")
    p.add_argument("--questions", default=None, help="an MT-Bench question.jsonl (default: the prompts folder)")
    p.add_argument("--model", default=None, help="as for `nbkit serve` (default: the embedded SmolLM2)")
    p.add_argument("--heads", default=None, help="as for `nbkit serve`")
    p.add_argument("--speculation", default="adaptive", help="nbkit's speculation, as for `nbkit serve`")
    p.add_argument("--serve-args", default="", help="extra `nbkit serve` arguments, e.g. '--device cuda'")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per server (default: each one's own)")
    p.add_argument("--llama-server", default=None, help="llama-server binary (default: built by nbkit, CPU)")
    p.add_argument("--llama-server-args", default="", help="extra llama-server arguments, e.g. '-ngl 99'")
    p.add_argument("--no-llama-server-off", action="store_true", help="skip llama-server with cache_prompt off")
    p.add_argument("--ctx-per-slot", type=int, default=4096, help="llama-server context per slot")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to load its model")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for one turn")
    p.add_argument("--out", default="bench-out/conversation.json")
    args = p.parse_args(argv)
    args.chats = args.chats or (1 if args.quick else 8)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    return args


def launch(config: Config, args, logs: Path) -> Server:
    """The server process of one configuration (not yet ready)."""
    port = srv.free_port()
    if config.engine is Engine.LLAMA_SERVER:
        cmd = srv.llama_server_command(_llama_server(args), _gguf(args.model), port, args.concurrency,
                                       args.ctx_per_slot, args.threads, args.llama_server_args.split())
    else:
        cmd = srv.nbkit_command(config, port, args.model, args.heads, args.speculation, max(16, args.concurrency),
                                args.serve_args.split())
    return Server(config.name, cmd, port, logs / (config.name.replace(" ", "_") + ".log"), args.threads)


def start_servers(configs: list[Config], args, logs: Path, log=print) -> dict[Config, Server]:
    """Every configuration's server, each ready and warmed up by one short turn. One at a time: adaptive
    speculation times the model while it starts, and a neighbour loading its own model would skew that."""
    servers: dict[Config, Server] = {}
    try:
        for config in configs:
            start = time.perf_counter()
            servers[config] = server = launch(config, args, logs).wait_ready(args.start_timeout)
            asyncio.run(serve_wave(server.url, config, [Chat("warm-up", ("Say hello.",))], 2, args.timeout))
            log(f"  {config.name}: ready in {time.perf_counter() - start:.0f} s")
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def _llama_server(args) -> Path:
    if args.llama_server:
        return Path(args.llama_server)
    from ..gguf.build import build_tools

    return build_tools(("llama-server",)) / "llama-server"


def _gguf(model: str | None) -> Path:
    """The GGUF file nbkit's llama.cpp engine serves for `model` (the same file for llama-server)."""
    from ..gguf.files import resolve_gguf
    from ..hub import fetch_model

    return resolve_gguf(fetch_model(model))


def report(args, done: dict[Config, dict], switch: bool) -> dict:
    from .closed_loop import machine_name

    summaries = {c.name: summarize(d["chats"], d["seconds"]) for c, d in done.items()}
    differing = {Config(e, Reuse.ON).name: differing_answers(done[Config(e, Reuse.ON)]["chats"],
                                                             done[Config(e, Reuse.OFF)]["chats"])
                 for e in Engine if Config(e, Reuse.ON) in done and Config(e, Reuse.OFF) in done}
    return {
        "command": "python -m nbkit.bench.conversation " + " ".join(args.argv), "machine": machine_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "prefix_cache_switch": switch, "configurations": summaries, "differing_from_reuse_off": differing,
        "target": verdicts(summaries, switch), "table": markdown(summaries, differing),
        "answers": {c.name: [[asdict(t) for t in chat] for chat in d["chats"]] for c, d in done.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        engines = [Engine(e.strip()) for e in args.engines.split(",") if e.strip()]
        chats = chain(read_questions(args.questions), args.turns)[: args.chats]
    except (ValueError, FileNotFoundError) as err:
        print(f"nbkit.bench.conversation: {err}", file=sys.stderr)
        return 2
    if not chats:
        print(f"nbkit.bench.conversation: no chat of {args.turns} turns in the questions", file=sys.stderr)
        return 2
    switch = srv.has_prefix_cache_switch(srv.serve_help())
    if not switch:
        print("note: `nbkit serve` has no --no-prefix-cache switch here: prefix reuse cannot be turned on and off, "
              "so the nbkit rows are the server as it is ('as is') and the reuse target is not measured", flush=True)
    configs = srv.configurations(engines, switch, llama_server_off=not args.no_llama_server_off)
    out = Path(args.out)
    print(f"{len(chats)} chats x {args.turns} turns, {args.max_tokens} tokens per answer, "
          f"{args.concurrency} at once: {', '.join(c.name for c in configs)}", flush=True)
    servers = start_servers(configs, args, out.parent / f"{out.stem}-logs", log=lambda line: print(line, flush=True))
    try:
        done = run_interleaved(servers, chats, args.max_tokens, args.concurrency, args.timeout,
                               log=lambda line: print(line, flush=True))
    finally:
        for server in servers.values():
            server.stop()
    result = report(args, done, switch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    for engine, verdict in result["target"].items():
        print(f"target, {engine} with reuse on: turn {args.turns} first token <= {TARGET_RATIO}x turn 1's: {verdict}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
