"""Measuring the cost model: real verification passes timed on the runner, before serving or while serving.

Every shape the policy prices is timed: one row of 1, 2, 3, 4, 8, ... tokens (rows of up to the base tree's
size), batches of short trees (4 rows and the full batch, 1 to 4 tokens each), and the heads for one row and
a full batch. Shapes are timed in interleaved rounds (every shape once per round, after one untimed warm-up
call each) and each keeps the median of its rounds, so a burst of load from elsewhere on a shared machine
hits every shape alike.

A Calibration is resumable: `advance()` runs one call at a time and stops as soon as `should_yield()` says so,
handing its slots back and keeping the samples it took. The engine uses that to calibrate while serving: on a
first start it serves at once with plain decoding, calibrates in its idle time (a request that arrives waits
for one call at most) and prices trees once every shape has its rounds (`Calibrate.WHILE_SERVING`).
"""

from __future__ import annotations

import enum
import logging
import statistics
import time
from collections.abc import Callable, Hashable

import torch

from ...medusa.heads import MedusaHeads
from ...medusa.trees import TOPK, chain
from ..runner import Runner, TreeInput
from .costs import CostModel

log = logging.getLogger("nbkit.engine")

PREFIX = 64  # tokens of context in each calibration slot (verification attends to them)
SHORT_TREES = (1, 2, 3, 4)  # tokens per row of the batch shapes (what the policy weighs under load)


class Calibrate(enum.Enum):
    """When the engine measures its forward costs (a start with a cached calibration measures nothing)."""

    AT_START = "at-start"  # before the engine reports ready: speculation priced from the first request
    WHILE_SERVING = "while-serving"  # ready at once; plain decoding until the idle time measured every shape


def batch_rows(max_batch: int) -> list[int]:
    """Row counts whose short trees calibration times: the full batch, and 4 rows between it and one. A
    batch size in between is priced by interpolating in rows, and cost is far from linear in rows (a 4 x 2
    step costs well under the 1.67x a 4 x 1 one that 1 and 16 rows interpolate to on an AVX2 CPU)."""
    return sorted({r for r in (4, max_batch) if 1 < r <= max_batch})


class Calibration:
    """The timed shapes of one calibration and the samples taken so far.

    Keys: n (one verification of n tokens, in rows of up to max_tree), ("rows", r, t) (r rows of t tokens),
    ("heads", r) (a heads call for r rows). On a CPU the cost is close to linear past a few hundred tokens,
    so sizes stop at 256 (the model extrapolates and the engine corrects it online from real steps); on a
    GPU at 1024.
    """

    def __init__(self, runner: Runner, heads: MedusaHeads | None, max_batch: int, max_tree: int = 64,
                 repeats: int = 7, max_tokens: int | None = None):
        if max_tokens is None:
            max_tokens = 1024 if str(runner.device).startswith("cuda") else 256
        self.runner, self.heads, self.max_tree, self.repeats = runner, heads, max_tree, repeats
        sizes = [1, 2, 3] + [n for n in (2 ** i for i in range(2, 16)) if n <= min(max_batch * max_tree, max_tokens)]
        self.rows: dict[Hashable, int] = {n: max(1, -(-n // max_tree)) for n in sizes}
        if max_batch > 1:
            self.rows.update({("rows", r, t): r for r in batch_rows(max_batch) for t in SHORT_TREES})
        if heads is not None:
            self.rows.update({("heads", r): 0 for r in sorted({1, max_batch})})
        self.samples: dict[Hashable, list[float]] = {k: [] for k in self.rows}
        self.warmed: set[Hashable] = set()
        self.seconds = 0.0  # spent calibrating, warm-ups and slot prefills included
        self.resumes = 0  # advance() calls that did work (1 when nothing interrupted it)

    # ---- progress ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(len(v) >= self.repeats for v in self.samples.values())

    def progress(self) -> float:
        """The share of the calls made (warm-ups included), 0..1."""
        total = len(self.rows) * (self.repeats + 1)
        return (len(self.warmed) + sum(min(len(v), self.repeats) for v in self.samples.values())) / total

    def slots_needed(self) -> int:
        return max(self.rows.values())

    def cells_needed(self) -> int:
        """KV cells the calibration slots hold at most (a shared cache must have them free)."""
        return self.slots_needed() * (PREFIX + self.max_tree)

    def _next(self) -> tuple[Hashable, bool] | None:
        """(key, timed) of the next call: every key's warm-up first, then round after round in key order."""
        for key in self.rows:
            if key not in self.warmed:
                return key, False
        low = min(len(v) for v in self.samples.values())
        if low >= self.repeats:
            return None
        return next(k for k in self.rows if len(self.samples[k]) == low), True

    # ---- measuring --------------------------------------------------------------------------
    def advance(self, alloc: Callable[[], int] | None = None, should_yield: Callable[[], bool] = lambda: False) -> bool:
        """Make calls until every shape has its rounds (True) or `should_yield()` (False: the samples are kept,
        the next advance goes on from there). Slots come from `alloc` (default: the runner's) and are freed
        before it returns either way."""
        alloc = alloc or self.runner.alloc
        slots: list[int] = []
        start = time.perf_counter()
        self.resumes += 1
        try:
            while (step := self._next()) is not None:
                if should_yield():
                    return False
                key, timed = step
                self._grow(slots, self.rows[key], alloc)
                seconds = self._call(key, slots)
                if timed:
                    self.samples[key].append(seconds)
                else:
                    self.warmed.add(key)
            return True
        finally:
            for s in slots:
                self.runner.free(s)
            self.seconds += time.perf_counter() - start

    def _grow(self, slots: list[int], n: int, alloc: Callable[[], int]) -> None:
        """Allocate slots (each with a PREFIX-token context) until there are `n`."""
        while len(slots) < n:
            slot = alloc()
            slots.append(slot)
            self.runner.prefill({slot: [1] * PREFIX})

    def _call(self, key: Hashable, slots: list[int]) -> float:
        """Seconds for one call of `key`'s shape, read with the device idle before and after: a GPU call returns
        once queued, and timed without synchronizing each shape would be charged the previous one's work."""
        return timed(lambda: self._run(key, slots), self.runner.synchronize)

    def _run(self, key: Hashable, slots: list[int]) -> None:
        runner = self.runner
        if isinstance(key, int):  # one verification of `key` tokens, in rows of up to max_tree
            rows = self.rows[key]
            runner.verify([TreeInput(s, chain(key // rows - 1), [1] * (key // rows)) for s in slots[:rows]])
        elif key[0] == "rows":  # r rows of a t-token tree
            _, r, t = key
            runner.verify([TreeInput(s, chain(t - 1), [1] * t) for s in slots[:r]])
        else:  # the heads' top-k proposals for r rows, on the runner's device
            heads = self.heads
            lm_head = runner.lm_head if heads.shared_lm_head else None  # own-lm_head heads never read the runner's
            heads.topk(torch.zeros(key[1], heads.hidden_size, dtype=runner.dtype, device=runner.device), lm_head, TOPK)

    # ---- the result -------------------------------------------------------------------------
    def cost_model(self) -> CostModel:
        """The CostModel of the medians (every shape must have its rounds: `done`)."""
        if not self.done:
            raise RuntimeError("the calibration is not finished")
        medians = {k: statistics.median(v) for k, v in self.samples.items()}
        points = {k: v for k, v in medians.items() if isinstance(k, int)}
        heads = {k[1]: v for k, v in medians.items() if isinstance(k, tuple) and k[0] == "heads"}
        log.info("cost model: %s, heads %s (%.1f s)", {k: round(v, 4) for k, v in points.items()},
                 {k: round(v, 4) for k, v in heads.items()}, self.seconds)
        model = CostModel(points, heads or 0.0)
        model.measured.update({(1, n): points[n] for n in SHORT_TREES if n in points})
        model.measured.update({(k[1], k[2]): v for k, v in medians.items() if isinstance(k, tuple) and k[0] == "rows"})
        model.set_reference()
        return model


def calibrate(runner: Runner, heads: MedusaHeads | None, max_batch: int, max_tree: int = 64, repeats: int = 7,
              max_tokens: int | None = None) -> CostModel:
    """Measure every shape now, without interruption (Calibrate.AT_START)."""
    calibration = Calibration(runner, heads, max_batch, max_tree, repeats, max_tokens)
    calibration.advance()
    return calibration.cost_model()


def interleaved_medians(calls: dict, repeats: int, synchronize: Callable[[], None]) -> dict:
    """{key: seconds} for arbitrary calls, timed as Calibration times shapes: one untimed warm-up call each,
    then `repeats` rounds calling every key once per round, the median of each key's rounds, the clock read
    with the device idle (`synchronize` before and after each call)."""
    for fn in calls.values():
        fn()
    times: dict = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            times[k].append(timed(fn, synchronize))
    return {k: statistics.median(ts) for k, ts in times.items()}


def timed(fn: Callable[[], object], synchronize: Callable[[], None]) -> float:
    """Seconds for fn(), the clock read with the device idle before and after."""
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0
