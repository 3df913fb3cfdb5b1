"""What keeps speculation honest while serving: the guard and the re-measurement.

The policy's choice is a prediction (a cost model and an acceptance estimate). The guard checks it
against what really happened: over a sliding window of speculative steps it compares their REALIZED
tokens per second with the rate of plain steps of the same batch size, measured on this engine. When
speculation is losing, it backs off (no speculation for a while, doubling each time it loses again) and
then re-probes. It asks for a plain step now and then, so the no-speculation rate it compares with
stays current.

The re-measurement: when real step times drift away from the cost model's reference (the machine got
busier or quieter), the next steps alternate plain and tree shapes for a few rounds on the running
batch (outputs are unchanged: greedy verification is lossless), and the medians replace the model's
figures for those shapes.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ...medusa.trees import MedusaTree

log = logging.getLogger("nbkit.engine")

GUARD_WINDOW = 24  # speculative steps the guard judges over
GUARD_MIN = 12  # ... and at least this many before it judges
GUARD_FLOOR = 1.03  # realized / plain below this: speculation stops (break-even has only risk to offer)
BACKOFF_FIRST, BACKOFF_MAX = 64, 4096  # steps without speculation after a loss (doubling)
PLAIN_REFRESH = 128  # steps after which a batch size's plain rate is re-measured by one plain step
PLAIN_SAMPLES = 9  # plain steps kept per batch size (median)
DRIFT_LIMIT = 1.3  # observed / reference step time beyond this (or below its inverse) triggers a re-measure
REMEASURE_ROUNDS = 3
REMEASURE_COOLDOWN = 512  # steps between re-measurements


class MeasuredCosts(Protocol):
    """What the re-measurement needs of a cost model (costs.CostModel)."""

    def drift(self) -> float | None: ...

    def install(self, shapes: dict[tuple[int, int], float]) -> None: ...


class SpeculationGuard:
    """Realized tokens/s of speculative steps vs measured plain steps of the same batch size."""

    def __init__(self):
        self.plain: dict[int, deque[float]] = {}  # batch size -> recent plain step seconds
        self.plain_at: dict[int, int] = {}  # batch size -> step of the last plain sample
        self.window: deque[tuple[int, float, int]] = deque(maxlen=GUARD_WINDOW)  # (tokens, seconds, rows)
        self.off_until = 0
        self.backoff = BACKOFF_FIRST
        self.backoffs = 0
        self.last_ratio: float | None = None

    def allows(self, step: int) -> bool:
        return step >= self.off_until

    def wants_plain(self, step: int, n_rows: int) -> bool:
        """True when this batch size's plain rate is unknown or stale: the next step should be plain."""
        return step - self.plain_at.get(n_rows, -10**9) >= PLAIN_REFRESH

    def plain_seconds(self, n_rows: int) -> float | None:
        """Median seconds of a plain step of n_rows (the nearest measured batch size, scaled by rows)."""
        if n_rows in self.plain:
            return statistics.median(self.plain[n_rows])
        if not self.plain:
            return None
        near = min(self.plain, key=lambda n: abs(math.log(n / n_rows)))
        return statistics.median(self.plain[near]) * (n_rows / near if n_rows > near else 1.0)

    def record(self, step: int, n_rows: int, speculated: bool, tokens: int, seconds: float, probed: bool) -> None:
        if not speculated:
            if not probed:  # a probe step also pays for the heads: not a plain step's price
                self.plain.setdefault(n_rows, deque(maxlen=PLAIN_SAMPLES)).append(seconds)
                self.plain_at[n_rows] = step
            return
        self.window.append((tokens, seconds, n_rows))
        self._judge(step)

    def _judge(self, step: int) -> None:
        """realized / plain = mean tokens per row and step / median step time in plain-step units. Step times
        on a shared machine come in bursts: the median keeps one burst from deciding (the plain side is a
        median too), while tokens, which bursts do not touch, are averaged."""
        if len(self.window) < GUARD_MIN:
            return
        tokens, times = [], []
        for n_tokens, seconds, rows in self.window:
            plain = self.plain_seconds(rows)
            if plain is None:
                return
            tokens.append(n_tokens / rows)
            times.append(seconds / plain)
        self.last_ratio = statistics.fmean(tokens) / max(statistics.median(times), 1e-9)
        if self.last_ratio < GUARD_FLOOR:
            log.info("speculation guard: realized/plain %.3f over %d steps, backing off for %d steps",
                     self.last_ratio, len(self.window), self.backoff)
            self.off_until = step + self.backoff
            self.backoff = min(2 * self.backoff, BACKOFF_MAX)
            self.backoffs += 1
            self.window.clear()
        elif len(self.window) == GUARD_WINDOW:
            self.backoff = BACKOFF_FIRST  # a full window that pays: the next loss starts short again

    def snapshot(self) -> dict:
        return {"guard_backoffs": self.backoffs, "guard_ratio": None if self.last_ratio is None
                else round(self.last_ratio, 3)}


class PassiveGuard(SpeculationGuard):
    """The guard of a declared price list (costs.DeclaredCostModel), whose prices are taken as given: it never
    stops speculation, never asks for a plain step and keeps no record (its snapshot stays at 0 back-offs)."""

    def allows(self, step: int) -> bool:
        return True

    def wants_plain(self, step: int, n_rows: int) -> bool:
        return False

    def record(self, step: int, n_rows: int, speculated: bool, tokens: int, seconds: float, probed: bool) -> None:
        return None


class Remeasure:
    """Alternates plain and tree shapes on the running batch for a few rounds when step times drift."""

    def __init__(self):
        self.queue: list[MedusaTree] = []
        self.times: dict[tuple[int, int], list[float]] = {}
        self.last = -REMEASURE_COOLDOWN
        self.count = 0

    @property
    def active(self) -> bool:
        return bool(self.queue)

    def maybe_start(self, step: int, cost: MeasuredCosts, shapes: Callable[[], list[MedusaTree]]) -> None:
        """Queue REMEASURE_ROUNDS rounds over the trees `shapes()` gives (plain first) when the cost model
        has drifted."""
        if self.queue or step - self.last < REMEASURE_COOLDOWN:
            return
        drift = cost.drift()
        if drift is None or 1 / DRIFT_LIMIT <= drift <= DRIFT_LIMIT:
            return
        trees = shapes()
        log.info("step times drifted (x%.2f of the cost model): re-measuring %s", drift, [t.name for t in trees])
        self.last = step
        for rnd in range(REMEASURE_ROUNDS):
            self.queue += trees if rnd % 2 == 0 else trees[::-1]

    def next_tree(self) -> MedusaTree:
        return self.queue.pop(0)

    def record(self, n_rows: int, size: int, seconds: float, cost: MeasuredCosts) -> None:
        """One re-measured step (verification seconds); the medians go to the model after the last."""
        self.times.setdefault((n_rows, size), []).append(seconds)
        if self.queue:
            return
        shapes = {k: statistics.median(v) for k, v in self.times.items() if len(v) >= 2}
        self.times = {}
        self.count += 1
        cost.install(shapes)
