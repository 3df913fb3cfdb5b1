"""What a verification step costs: the CostModel (seconds as a function of the step's shape).

Its figures come from calibration.py (real forward passes timed on the runner). While serving,
the engine feeds every step's time back (`observe`); the model keeps the calibration as its reference
and reports `drift()`, the median ratio of observed to reference times, so the policy can re-measure
when the machine has changed under it. A DeclaredCostModel (`CostModel.from_function`) is a price list
taken as given: it never learns, never drifts, and the guard it gives the policy never intervenes.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable

from .guard import PassiveGuard, SpeculationGuard

log = logging.getLogger("nbkit.engine")

DRIFT_WINDOW = 32  # recent steps whose observed / reference time ratio is the drift
SHAPE_EMA = 0.025  # how fast a tree shape's figure follows what the level leaves of its error (slow: a property)


class CostModel:
    """Seconds for one verification step as a function of tokens in the step (piecewise linear).

    Calibrated at start-up by timing real forward passes, then corrected online from the step
    times the engine observes (ema 0 keeps the figures as they are). A price is a shape's own figure times
    the machine's current `level`: every observed step moves the level (a shared machine slows down and
    speeds up every shape alike), and a shape's own figure keeps only the slow remainder of its error. Were
    each shape to follow its own observations, the plain step, observed at every step, would follow the
    machine while tree shapes kept the prices of the moment they last ran, and under a burst of load
    trees would look cheap next to plain decoding. The policy checks a CostModel's predictions with its
    guard; a price list that is declared, not measured, is a DeclaredCostModel.
    """

    def __init__(self, points: dict[int, float], heads_cost: float | dict[int, float] = 0.0, ema: float = 0.1):
        if not points:
            raise ValueError("a cost model needs at least one measured point")
        self.points = dict(sorted(points.items()))
        # seconds for one heads call: a constant, or measured {rows: seconds} (1 row costs less than 16)
        self.heads_points = dict(sorted(heads_cost.items())) if isinstance(heads_cost, dict) else {1: heads_cost}
        self.heads_cost = max(self.heads_points.values())
        self.ema = ema
        self.measured: dict[tuple[int, int], float] = {}  # (rows, tokens per row) -> seconds, from real steps
        self.version = 0  # bumped when a shape is measured for the first time (cached choices go stale)
        self.level = 1.0  # the machine's speed now relative to the figures above (every price is multiplied by it)
        self._lock = threading.Lock()
        self.set_reference()

    def guard(self) -> SpeculationGuard:
        """A fresh guard for the policy that prices steps with this model: a measured model's predictions are
        checked against the realized rates (a DeclaredCostModel's guard never intervenes)."""
        return SpeculationGuard()

    def set_reference(self) -> None:
        """Take the current curve and shapes as the reference that `drift()` compares real steps with
        (after calibration and after every re-measurement)."""
        with self._lock:
            self._fold_level()
            self.reference = (dict(self.points), dict(self.measured))
            self.ratios: deque[float] = deque(maxlen=DRIFT_WINDOW)

    def _fold_level(self) -> None:
        """Make the current level part of every figure (the level is then 1); the caller holds the lock."""
        if self.level != 1.0:
            self.points = {n: v * self.level for n, v in self.points.items()}
            self.measured = {k: v * self.level for k, v in self.measured.items()}
            self.heads_points = {n: v * self.level for n, v in self.heads_points.items()}
            self.heads_cost = max(self.heads_points.values())
            self.level = 1.0

    def drift(self) -> float | None:
        """Median of observed / reference seconds over the last DRIFT_WINDOW steps (None: too few yet)."""
        with self._lock:
            ratios = list(self.ratios)
        return statistics.median(ratios) if len(ratios) >= DRIFT_WINDOW // 2 else None

    def _reference_seconds(self, n_rows: int, per_row: int) -> float:
        points, measured = self.reference
        if (n_rows, per_row) in measured:
            return measured[(n_rows, per_row)]
        return _curve(points, n_rows * per_row)

    def install(self, shapes: dict[tuple[int, int], float]) -> None:
        """Re-measured shapes replace what the model held; the curve moves by their median ratio to it, so
        shapes that were not re-measured follow the machine too; the new state becomes the reference."""
        ratios = [v / max(self.step(*k), 1e-9) for k, v in shapes.items()]
        with self._lock:
            self._fold_level()
            if ratios:
                scale = statistics.median(ratios)
                self.points = {n: v * scale for n, v in self.points.items()}
            self.measured.update(shapes)
            self.version += 1
        self.set_reference()

    def step(self, n_rows: int, per_row: int) -> float:
        """Seconds for a step of n_rows x per_row tokens: measured for that shape if it has run
        (16 rows x 2 tokens costs more than 1 row x 32), else the calibrated curve."""
        known = self.measured.get((n_rows, per_row))
        if known is not None:
            return known * self.level
        # Between two measured row counts with the same tokens per row: interpolate in rows.
        by_rows = {r: v for (r, t), v in list(self.measured.items()) if t == per_row}
        if by_rows and min(by_rows) < n_rows < max(by_rows):
            return _lerp(by_rows, n_rows) * self.level
        return self(n_rows * per_row)

    def heads(self, n_rows: int) -> float:
        """Seconds for the heads on n_rows hidden states (linear between the measured row counts)."""
        first = min(self.heads_points)
        if len(self.heads_points) == 1 or n_rows <= first:
            return self.heads_points[first] * self.level
        return max(0.0, _lerp(self.heads_points, n_rows)) * self.level

    @staticmethod
    def from_function(fn: Callable[[int], float], heads_cost: float = 0.0, max_tokens: int = 1024) -> DeclaredCostModel:
        """A declared price list: fn(tokens) seconds at 1, 2, 4, ... max_tokens tokens."""
        return DeclaredCostModel({n: fn(n) for n in _buckets(max_tokens)}, heads_cost)

    def __call__(self, n_tokens: int) -> float:
        return _curve(self.points, n_tokens) * self.level

    def observe(self, n_tokens: int, seconds: float, n_rows: int | None = None) -> None:
        """Fold a measured step time into the level; a step of several tokens per row (or of no single shape,
        n_rows None: the curve's nearest bucket) also folds what is left of its error into its own figure.
        Plain steps set the scale: what they show is the machine's speed, never their own price next to a
        tree's. A shape seen for the first time takes the time as its figure at the current level."""
        if self.ema <= 0 or n_tokens <= 0:
            return
        key = (n_rows, n_tokens // n_rows) if n_rows else None
        if key is not None:
            self.ratios.append(seconds / max(self._reference_seconds(*key), 1e-9))
        with self._lock:
            if key is not None and key not in self.measured:
                self.measured[key] = seconds / self.level
                self.version += 1
                return
            base = self.measured[key] if key is not None else _curve(self.points, n_tokens)
            self.level *= (1 - self.ema) + self.ema * seconds / max(base * self.level, 1e-12)
            per_row = key[1] if key is not None else n_tokens
            if per_row == 1:
                return
            rest = (1 - SHAPE_EMA) + SHAPE_EMA * seconds / max(base * self.level, 1e-12)
            if key is not None:
                self.measured[key] = base * rest
            else:
                bucket = min(self.points, key=lambda x: abs(math.log2(x) - math.log2(n_tokens)))
                self.points[bucket] *= rest


class DeclaredCostModel(CostModel):
    """A declared price list (tests, or an operator pinning the policy's behaviour): taken as given. It learns
    nothing from real steps, so it never drifts (no re-measurement), and its guard never intervenes."""

    def __init__(self, points: dict[int, float], heads_cost: float | dict[int, float] = 0.0):
        super().__init__(points, heads_cost, ema=0.0)

    def guard(self) -> SpeculationGuard:
        return PassiveGuard()

    def observe(self, n_tokens: int, seconds: float, n_rows: int | None = None) -> None:
        return None

    def drift(self) -> float | None:
        return None


def _curve(points: dict[int, float], n_tokens: int) -> float:
    """Seconds for n_tokens on a calibrated curve: proportional below its first point, linear after."""
    first = min(points)
    if n_tokens <= first:
        return points[first] * n_tokens / first if first > 1 else points[first]
    if len(points) == 1:
        return points[first] * n_tokens / first
    return _lerp(points, n_tokens)


def _lerp(points: dict[int, float], x: float) -> float:
    """Piecewise-linear through points (>= 2), extended linearly past the last one."""
    xs = sorted(points)
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    return points[x0] + (points[x1] - points[x0]) * (x - x0) / (x1 - x0)


def _buckets(max_tokens: int) -> list[int]:
    out, n = [], 1
    while n <= max_tokens:
        out.append(n)
        n *= 2
    return out
