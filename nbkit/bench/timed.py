"""Timed runs on an engine, as the GPU check measures them (the clock is read after the device is done)."""

from __future__ import annotations

import time

from ..engine.request import SamplingParams


def tok_s(tokens: int, seconds: float) -> float:
    return round(tokens / max(seconds, 1e-9), 2)


def run_batch(engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list, float]:
    """(Finished per prompt, seconds): all submitted at once, stepped in this thread to the end."""
    t0 = time.perf_counter()
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    while any(h.finished is None for h in handles):
        engine.step()
    engine.runner.synchronize()
    return [h.finished for h in handles], time.perf_counter() - t0
