"""A bounded load test for a running nbkit server: every kind of request at once, every one accounted for.

    python -m nbkit.bench.loadtest --url http://127.0.0.1:8000 --requests 300 --concurrency 64

Each request ends in exactly one outcome:
- "answered": HTTP 200 with a complete answer (a finish reason; for streams the final event or `[DONE]`);
- "refused":  HTTP 429 (queue full or rate limit): the client should come back after Retry-After;
- "failed":   any other status, an error event inside a stream, or an answer without its end;
- "lost":     no answer within `timeout` seconds, or the connection broke.
A reliable server has no "failed" and no "lost". The run is bounded: at most `requests` requests, each
given up after `timeout`, the whole run after `deadline`; it only talks to the URL it is given.

`--verify` then sends each distinct prompt alone, greedy and without speculation, and counts answers of
the load that differ from that solo answer (concurrency, batching and speculation must not change them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from ..client import DONE, asse_events, auth_headers

ROUTES = ("original", "tgi", "tgi_stream", "completions", "completions_stream", "chat", "chat_stream")
STREAMING = frozenset({"tgi_stream", "completions_stream", "chat_stream"})

_STORY = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as his father had "
          "taught him, and watched the ships pass along the rocky coast while the weather turned. ")
PROMPTS = (
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
    "Translate to French: good morning, my friend.",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "Summarize: " + _STORY * 2,
    "Continue the story: " + _STORY * 8,
)


@dataclass(frozen=True)
class Job:
    index: int
    route: str
    prompt: str
    max_tokens: int
    speculate: bool

    @property
    def chat(self) -> bool:
        """Whether the server applies the chat template (the reference must too)."""
        return self.route.startswith("chat")


@dataclass
class Outcome:
    job: Job
    kind: str  # answered | refused | failed | lost
    status: int | None
    latency: float
    text: str | None = None
    finish_reason: str | None = None
    detail: str = ""
    retry_after: float = 1.0


@dataclass
class Report:
    requests: int
    concurrency: int
    outcomes: list[Outcome]
    seconds: float
    statuses: Counter = field(default_factory=Counter)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def max_latency(self) -> float:
        return max((o.latency for o in self.outcomes), default=0.0)

    def percentile(self, q: float, kind: str = "answered") -> float:
        values = sorted(o.latency for o in self.outcomes if o.kind == kind)
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    def summary(self) -> dict:
        return {"requests": self.requests, "sent": len(self.outcomes), "concurrency": self.concurrency,
                "answered": self.count("answered"), "refused": self.count("refused"),
                "failed": self.count("failed"), "lost": self.count("lost"),
                "server_errors": sum(n for s, n in self.statuses.items() if s is not None and s >= 500),
                "max_latency_s": round(self.max_latency, 2),
                "p50_answered_s": round(self.percentile(0.5), 2), "p99_answered_s": round(self.percentile(0.99), 2),
                "wall_s": round(self.seconds, 1)}


def make_jobs(n: int, seed: int = 0, prompts=PROMPTS, max_tokens=(1, 2, 4, 8),
              routes=ROUTES, no_speculation_every: int = 3) -> list[Job]:
    """A reproducible mix: every route, prompt lengths from 1 to a few hundred tokens, several max_tokens,
    and one request in `no_speculation_every` with speculation off."""
    rng = random.Random(seed)
    return [Job(i, routes[i % len(routes)], rng.choice(prompts), rng.choice(max_tokens),
                speculate=rng.randrange(no_speculation_every) != 0) for i in range(n)]


def request_for(job: Job, model: str | None = None) -> tuple[str, dict]:
    """(path, JSON body) for a greedy request of `job`."""
    if job.route == "original":
        return "/generate", {"prompt": job.prompt, "max_tokens": job.max_tokens, "speculate": job.speculate}
    if job.route in ("tgi", "tgi_stream"):
        body = {"inputs": job.prompt,
                "parameters": {"max_new_tokens": job.max_tokens, "speculate": job.speculate, "details": True}}
        return ("/generate" if job.route == "tgi" else "/generate_stream"), body
    common = {"max_tokens": job.max_tokens, "temperature": 0, "speculate": job.speculate,
              "stream": job.route in STREAMING}
    if model:
        common["model"] = model
    if job.chat:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": job.prompt}], **common}
    return "/v1/completions", {"prompt": job.prompt, **common}


async def run_one(http: httpx.AsyncClient, job: Job, timeout: float, model: str | None = None) -> Outcome:
    path, body = request_for(job, model)
    start = time.monotonic()
    try:
        if job.route in STREAMING:
            outcome = await asyncio.wait_for(_stream(http, job, path, body), timeout)
        else:
            outcome = _plain(job, await asyncio.wait_for(http.post(path, json=body), timeout))
    except (TimeoutError, asyncio.TimeoutError):
        outcome = Outcome(job, "lost", None, 0.0, detail=f"no answer within {timeout} s")
    except httpx.HTTPError as err:
        outcome = Outcome(job, "lost", None, 0.0, detail=f"{type(err).__name__}: {err}")
    outcome.latency = time.monotonic() - start
    return outcome


def _classify(job: Job, r: httpx.Response) -> Outcome | None:
    """The outcome of a non-200 answer (None for 200)."""
    if r.status_code == 200:
        return None
    if r.status_code == 429:
        try:
            retry_after = float(r.headers.get("retry-after", 1))
        except ValueError:
            retry_after = 1.0
        return Outcome(job, "refused", 429, 0.0, detail=r.text[:300], retry_after=retry_after)
    return Outcome(job, "failed", r.status_code, 0.0, detail=r.text[:300])


def _plain(job: Job, r: httpx.Response) -> Outcome:
    if (bad := _classify(job, r)) is not None:
        return bad
    try:
        body = r.json()
        if job.route == "original":
            text, reason = body["response"], body["finish_reason"]
        elif job.route == "tgi":
            text, reason = body["generated_text"], body["details"]["finish_reason"]
        elif job.route == "completions":
            text, reason = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
        else:
            text, reason = body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        return Outcome(job, "failed", r.status_code, 0.0, detail=f"malformed answer ({err!r}): {r.text[:300]}")
    if not reason:
        return Outcome(job, "failed", r.status_code, 0.0, detail="no finish reason")
    return Outcome(job, "answered", 200, 0.0, text=text, finish_reason=reason)


async def _stream(http: httpx.AsyncClient, job: Job, path: str, body: dict) -> Outcome:
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return _classify(job, r)
        pieces, final_text, reason, done = [], None, None, False
        async for event in asse_events(r.aiter_lines()):
            if event == DONE:
                done = True
                break
            if "error" in event:
                return Outcome(job, "failed", 200, 0.0, detail=f"error event: {json.dumps(event)[:300]}")
            if job.route == "tgi_stream":
                pieces.append(event["token"]["text"])
                if event.get("details"):
                    final_text, reason, done = event["generated_text"], event["details"]["finish_reason"], True
                    break
            else:
                for choice in event.get("choices", ()):
                    piece = choice["delta"].get("content") if job.chat else choice.get("text")
                    pieces.append(piece or "")
                    reason = choice.get("finish_reason") or reason
    text = "".join(pieces)
    if not done or reason is None:
        return Outcome(job, "failed", 200, 0.0, text=text, detail="the stream ended without its final event")
    if final_text is not None and final_text != text:
        return Outcome(job, "failed", 200, 0.0, text=text,
                       detail=f"token texts {text!r} differ from generated_text {final_text!r}")
    return Outcome(job, "answered", 200, 0.0, text=text, finish_reason=reason)


async def run_load(url: str, jobs: list[Job], concurrency: int = 64, *, timeout: float = 120.0,
                   deadline: float = 600.0, api_key: str | None = None, model: str | None = None,
                   backoff_cap: float = 8.0, seed: int = 0) -> Report:
    """Send `jobs` with `concurrency` clients at once. A refused client backs off as well-behaved clients
    do (the server's Retry-After, doubled after each refusal in a row, at most `backoff_cap` s, with
    jitter) before its next job; refused jobs count as refused and are not resent."""
    headers = auth_headers(api_key)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    pending = list(reversed(jobs))
    outcomes: list[Outcome] = []
    statuses: Counter = Counter()
    rng = random.Random(seed)
    start = time.monotonic()
    stop_at = start + deadline

    async def client(http: httpx.AsyncClient) -> None:
        refusals = 0
        while pending and time.monotonic() < stop_at:
            job = pending.pop()
            outcome = await run_one(http, job, min(timeout, max(1.0, stop_at - time.monotonic())), model)
            outcomes.append(outcome)
            statuses[outcome.status] += 1
            refusals = refusals + 1 if outcome.kind == "refused" else 0
            if refusals:
                wait = min(backoff_cap, outcome.retry_after * 2 ** (refusals - 1))
                await asyncio.sleep(wait * rng.uniform(0.5, 1.0))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout),
                                 limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return Report(len(jobs), concurrency, outcomes, time.monotonic() - start, statuses)


async def solo_answers(url: str, jobs: list[Job], *, api_key: str | None = None,
                       timeout: float = 120.0) -> dict[tuple[str, bool, int], str]:
    """Each distinct (prompt, chat, max_tokens) of `jobs` sent alone, greedy, speculation off."""
    headers = auth_headers(api_key)
    answers = {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as http:
        for key in sorted({(j.prompt, j.chat, j.max_tokens) for j in jobs}):
            prompt, chat, max_tokens = key
            r = await http.post("/generate", json={"prompt": prompt, "chat": chat, "max_tokens": max_tokens,
                                                   "speculate": False})
            r.raise_for_status()
            answers[key] = r.json()["response"]
    return answers


def markdown(report: Report, command: str, mismatches: int | None = None) -> str:
    s = report.summary()
    rows = [("requests sent", f"{s['sent']} of {s['requests']}"), ("concurrency", s["concurrency"]),
            ("answered (complete)", s["answered"]), ("refused (429)", s["refused"]), ("failed", s["failed"]),
            ("lost (no answer)", s["lost"]), ("5xx answers", s["server_errors"]),
            ("max latency (any outcome)", f"{s['max_latency_s']} s"),
            ("answered latency p50 / p99", f"{s['p50_answered_s']} s / {s['p99_answered_s']} s"),
            ("wall time", f"{s['wall_s']} s")]
    if mismatches is not None:
        rows.append(("answers different from the solo greedy answer", mismatches))
    lines = [f"`{command}`", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbkit.bench.loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before one request counts as lost")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds before the whole run stops")
    p.add_argument("--max-tokens", default="1,2,4,8", help="comma-separated choices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="Bearer key (default: none)")
    p.add_argument("--verify", action="store_true", help="compare answers with solo greedy answers afterwards")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    jobs = make_jobs(args.requests, args.seed, max_tokens=tuple(int(x) for x in args.max_tokens.split(",")))
    report = asyncio.run(run_load(args.url, jobs, args.concurrency, timeout=args.timeout, deadline=args.deadline,
                                  api_key=args.api_key, seed=args.seed))
    mismatches = None
    if args.verify:
        solo = asyncio.run(solo_answers(args.url, jobs, api_key=args.api_key, timeout=args.timeout))
        mismatches = sum(o.text != solo[(o.job.prompt, o.job.chat, o.job.max_tokens)]
                         for o in report.outcomes if o.kind == "answered")
    for o in report.outcomes:
        if o.kind in ("failed", "lost"):
            print(f"{o.kind}: job {o.job.index} {o.job.route} status={o.status}: {o.detail}", file=sys.stderr)
    if args.markdown:
        print(markdown(report, "python -m nbkit.bench.loadtest " + " ".join(argv or sys.argv[1:]), mismatches))
    else:
        print(json.dumps({**report.summary(), **({"mismatches": mismatches} if args.verify else {})}))
    bad = report.count("failed") + report.count("lost") + (mismatches or 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
