"""A periodic engine line while there is work, as vLLM's "Avg prompt throughput ..." and TGI's logs do.

Driven by the engine's on_step hook (so it runs on the engine thread and says nothing while idle): once
`interval` seconds have passed since the interval began, one line on logger "nbkit.engine" with the
running and waiting requests, prompt and generation tokens/s over the interval, the KV cache in use,
the prefix cache's hit rate and the speculation in use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("nbkit.engine")


@dataclass(frozen=True)
class Mark:
    """Where an interval began: the clock and the engine's cumulative counters then."""

    at: float
    prefill_tokens: int
    tokens: int
    spec_steps: int
    spec_tokens: int

    @classmethod
    def of(cls, at: float, s: dict) -> Mark:
        return cls(at, s["prefill_tokens"], s["tokens"], s["spec_steps"], s["spec_tokens"])


def engine_line(s: dict, start: Mark, now: float) -> str:
    """One line from the snapshot `s` and the interval that began at `start` (key=value pairs).

    prefix_hit_rate: cached / prompt tokens of the finished requests (engine/prefix.py); "off" without reuse."""
    dt = max(now - start.at, 1e-9)
    kv = s["kv_used_tokens"] / s["kv_total_tokens"] if s["kv_total_tokens"] else 0.0
    hit = s["prefix_hit_rate"] if s.get("prefix_cache") else None
    spec_steps = s["spec_steps"] - start.spec_steps
    per_step = (s["spec_tokens"] - start.spec_tokens) / spec_steps if spec_steps else 0.0
    return (f"running={s['running']} waiting={s['waiting']} "
            f"prompt_tok_s={(s['prefill_tokens'] - start.prefill_tokens) / dt:.1f} "
            f"gen_tok_s={(s['tokens'] - start.tokens) / dt:.1f} "
            f"kv_use={100 * kv:.1f}% kv_tokens={s['kv_used_tokens']}/{s['kv_total_tokens']} "
            f"prefix_hit_rate={'off' if hit is None else f'{100 * hit:.1f}%'} "
            f"speculation={s['speculation']} tree={s['last_tree']} tokens_per_spec_step={per_step:.2f}")


class EngineLog:
    """Logs `engine_line` every `interval` seconds of work. An interval begins at the first decoding step after
    idle, so a line never averages over time the engine had nothing to do; its counts start from the moment the
    engine went idle, so the prompt prefilled before that first step is counted in it."""

    def __init__(self, engine, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if interval <= 0:
            raise ValueError("interval must be positive (leave the EngineLog out to turn the lines off)")
        self.engine, self.interval, self.clock = engine, interval, clock
        self.start: Mark | None = None  # None: idle (no interval open)
        self.rest: dict | None = None  # the counters when the engine went idle (the next interval counts from them)

    def attach(self) -> EngineLog:
        """Observe the engine's steps, chaining any previous on_step hook (the metrics')."""
        previous = self.engine.on_step
        self.rest = dict(self.engine.counters)

        def on_step(info: dict) -> None:
            self.step()
            if previous is not None:
                previous(info)

        self.engine.on_step = on_step
        return self

    def step(self) -> None:
        """After each decoding step (engine thread). Per step only the clock and the counters are read: the
        full snapshot (acceptance statistics included) is taken once per line."""
        now, engine = self.clock(), self.engine
        if self.start is None:
            self.start = Mark.of(now, self.rest or engine.counters)
        elif now - self.start.at >= self.interval:
            s = engine.snapshot()
            log.info(engine_line(s, self.start, now))
            self.start = Mark.of(now, s)
        if not engine.active and not engine.waiting:
            self.start, self.rest = None, dict(engine.counters)  # idle from here: the next work opens an interval
