"""Load-adaptive speculation: which tree each step, from measured costs and measured acceptance.

Throughput of a step = tokens it emits / time it takes. With B running requests of which S may
speculate, verifying a tree of T nodes costs cost(B * T) (rows are padded to the largest tree) plus
the heads, and emits on average S * E(tree) + (B - S) tokens, where
    E(tree) = 1 + sum over the tree's paths p of P(p accepted),
    P(p)    = prod over depths d of q[d][p_d],
and q[d][r] is the measured probability that, having accepted up to depth d, the walk moves into
the rank-r candidate of head d. The policy picks the tree (none, a chain, or the best sub-tree of
the published tree with n nodes) that maximizes that ratio; on a GPU, where 64 tokens cost about
as much as 1, it picks big trees; on a CPU under load it picks small ones or none.
`calibrate()` measures the cost curve on the runner at start-up.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable

import torch

from ..medusa.heads import MedusaHeads
from ..medusa.trees import TOPK, MedusaTree, chain, subtree
from .runner import Runner, TreeInput

log = logging.getLogger("nbkit.engine")


class CostModel:
    """Seconds for one verification step as a function of tokens in the step (piecewise linear).

    Calibrated at start-up by timing real forward passes, then corrected online from the step
    times the engine observes (exponential moving average per power-of-two bucket).
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
        self._lock = threading.Lock()

    def step(self, n_rows: int, per_row: int) -> float:
        """Seconds for a step of n_rows x per_row tokens: measured for that shape if it has run
        (16 rows x 2 tokens costs more than 1 row x 32), else the calibrated curve."""
        known = self.measured.get((n_rows, per_row))
        if known is not None:
            return known
        # Between two measured row counts with the same tokens per row: interpolate in rows.
        by_rows = {r: v for (r, t), v in list(self.measured.items()) if t == per_row}
        if by_rows and min(by_rows) < n_rows < max(by_rows):
            return _lerp(by_rows, n_rows)
        return self(n_rows * per_row)

    def heads(self, n_rows: int) -> float:
        """Seconds for the heads on n_rows hidden states (linear between the measured row counts)."""
        first = min(self.heads_points)
        if len(self.heads_points) == 1 or n_rows <= first:
            return self.heads_points[first]
        return max(0.0, _lerp(self.heads_points, n_rows))

    @classmethod
    def from_function(cls, fn: Callable[[int], float], heads_cost: float = 0.0, max_tokens: int = 1024) -> CostModel:
        return cls({n: fn(n) for n in _buckets(max_tokens)}, heads_cost, ema=0.0)

    def __call__(self, n_tokens: int) -> float:
        first = min(self.points)
        if n_tokens <= first:
            return self.points[first] * n_tokens / first if first > 1 else self.points[first]
        if len(self.points) == 1:
            return self.points[first] * n_tokens / first
        return _lerp(self.points, n_tokens)

    def observe(self, n_tokens: int, seconds: float, n_rows: int | None = None) -> None:
        """Fold a measured step time into its shape's record and the nearest bucket of the curve."""
        if self.ema <= 0 or n_tokens <= 0:
            return
        if n_rows:
            key = (n_rows, n_tokens // n_rows)
            with self._lock:
                old = self.measured.get(key)
                self.measured[key] = seconds if old is None else (1 - 2 * self.ema) * old + 2 * self.ema * seconds
                if old is None:
                    self.version += 1
        bucket = min(self.points, key=lambda x: abs(math.log2(x) - math.log2(n_tokens)))
        scaled = seconds * self(bucket) / max(self(n_tokens), 1e-9)
        with self._lock:
            self.points[bucket] = (1 - self.ema) * self.points[bucket] + self.ema * scaled


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


class AcceptanceStats:
    """q[d][r]: probability of moving from depth d into the rank-r candidate of head d.

    Updated from "probes": the heads' top-k at some position, compared with the tokens the request
    actually produced next. That measures every (depth, rank), whatever tree was used, so the
    statistics stay honest even while the policy runs no tree at all.
    """

    def __init__(self, n_heads: int, topk: int = TOPK, prior_trials: float = 4.0,
                 measured: list[list[float]] | None = None):
        self.n_heads, self.topk = n_heads, topk
        if measured is not None and len(measured) >= n_heads:
            # q measured when the heads were trained (held-out prompts) counts as 50 observations.
            prior = torch.tensor([row[:topk] for row in measured[:n_heads]], dtype=torch.float32)
            prior_trials = 50.0
        else:
            # Prior: head d's top-1 is right ~0.6 * 0.7^d of the time, lower ranks much less.
            prior = torch.tensor([[0.6 * 0.7**d / (1 + 2 * r) for r in range(topk)] for d in range(n_heads)])
        self.hits = prior * prior_trials
        self.trials = torch.full((n_heads, topk), prior_trials)
        self.proposed = 0  # tree tokens sent to verification beyond the root
        self.accepted = 0  # of those, accepted
        self._lock = threading.Lock()

    def resolve_probes(self, probes: list[tuple[int, torch.Tensor]], output_ids: list[int],
                       final: bool) -> list[tuple[int, torch.Tensor]]:
        """Observe the probes (output position, heads' top-k) whose next tokens are all known (all of
        them when the request is `final`); returns the probes still waiting for tokens."""
        keep = []
        for start, top in probes:
            actual = output_ids[start:]
            if len(actual) >= self.n_heads or final:
                if actual:
                    self.observe_probe(top, actual)
            else:
                keep.append((start, top))
        return keep

    def observe_probe(self, head_topk: torch.Tensor, actual: list[int]) -> None:
        """head_topk [n_heads, k] at a position; actual = the tokens that followed the pending token."""
        with self._lock:
            for d, token in enumerate(actual[: self.n_heads]):
                self.trials[d] += 1
                ranks = (head_topk[d] == token).nonzero()
                if len(ranks) == 0:
                    return
                self.hits[d, int(ranks[0])] += 1

    def q(self) -> torch.Tensor:
        with self._lock:
            return self.hits / self.trials

    def path_scores(self, tree: MedusaTree) -> dict[tuple[int, ...], float]:
        q = self.q()
        scores = {}
        for p in tree.paths:
            prob = 1.0
            for d, r in enumerate(p):
                prob *= float(q[d, r]) if d < self.n_heads else 0.0
            scores[p] = prob
        return scores

    def expected_tokens(self, tree: MedusaTree) -> float:
        """E(tree) = 1 + sum of path acceptance probabilities (bonus token included)."""
        return 1.0 + sum(self.path_scores(tree).values())

    def snapshot(self) -> dict:
        q = self.q()
        return {
            "top1_by_head": [round(float(q[d, 0]), 4) for d in range(self.n_heads)],
            "proposed_tokens": self.proposed,
            "accepted_tokens": self.accepted,
        }


PROBE_EVERY = 8  # steps between acceptance probes for requests that are not speculating
SUBTREE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 63)
REBUILD_EVERY = 256  # steps between rebuilds of the candidate trees from the statistics (a rebuild is dear)
RECHOOSE_EVERY = 16  # steps a choice is reused for the same batch shape (pricing every candidate is not free)
# A tree must promise this much more than no speculation: the prices are estimates (a shape that has
# not run yet is read off the 1-row curve, and the machine is noisy); small predicted gains were
# measured as losses (docs/measurements.md).
SPECULATION_MARGIN = 0.10


class SpeculationPolicy:
    """Chooses the tree for the next step. mode: 'adaptive', 'off', or a fixed tree."""

    def __init__(self, base_tree: MedusaTree, stats: AcceptanceStats, cost: CostModel,
                 mode: str = "adaptive", fixed: MedusaTree | None = None, max_leaves: int | None = None):
        self.base_tree, self.stats, self.cost, self.mode, self.fixed = base_tree, stats, cost, mode, fixed
        self.max_leaves = max_leaves  # total leaf budget per step (llama.cpp sequence ids), None = no limit
        self.none = chain(0)
        self._candidates: list[tuple[MedusaTree, float]] = []
        self._refresh_in = 0
        # (rows, speculating rows) -> tree. Speculation must not cost the step time it means to save:
        # pricing every candidate at every step would be a visible part of a short CPU step.
        self._memo: dict[tuple[int, int], MedusaTree] = {}
        self._memo_age = 0
        self._memo_version = -1
        self.last_choice = self.none
        self.choices: dict[str, int] = {}

    def candidates(self) -> list[tuple[MedusaTree, float]]:
        """[(tree, expected tokens)], rebuilt from the statistics every REBUILD_EVERY steps."""
        if self._refresh_in <= 0 or not self._candidates:
            scores = self.stats.path_scores(self.base_tree)
            trees = [self.none] + [subtree(self.base_tree, scores, n)
                                   for n in SUBTREE_SIZES if n <= len(self.base_tree.paths)]
            self._candidates = [(t, self.stats.expected_tokens(t)) for t in trees]
            self._refresh_in = REBUILD_EVERY
            self._memo.clear()
        self._refresh_in -= 1
        return self._candidates

    def probe_due(self, step: int, n_active: int) -> bool:
        """While no tree runs, the heads still look ahead now and then so the acceptance statistics
        stay current; probes are spaced by the heads' measured cost so they stay a small part of decoding."""
        if self.mode != "adaptive":
            return False
        every = PROBE_EVERY
        if self.cost.heads_cost > 0:
            step_cost = max(self.cost(n_active), 1e-6)
            every = max(PROBE_EVERY, round(100 * self.cost.heads(n_active) / step_cost))
        return step % every == 0

    def choose(self, n_rows: int, n_speculative: int) -> MedusaTree:
        """The tree for the speculating rows this step (the others run a root-only tree)."""
        if self.mode == "off" or n_speculative == 0:
            choice = self.none
        elif self.mode == "fixed":
            choice = self.fixed
        else:
            choice = self._best(n_rows, n_speculative)
        self.last_choice = choice
        self.choices[choice.name] = self.choices.get(choice.name, 0) + 1
        return choice

    def _best(self, n_rows: int, n_speculative: int) -> MedusaTree:
        """The candidate with the most expected tokens per second, reused for RECHOOSE_EVERY steps."""
        candidates = self.candidates()
        self._memo_age += 1
        if self._memo_age >= RECHOOSE_EVERY or self._memo_version != self.cost.version:
            self._memo.clear()
            self._memo_age = 0
            self._memo_version = self.cost.version
        key = (n_rows, n_speculative)
        if key not in self._memo:
            best, best_rate = self.none, -1.0
            for tree, expected in candidates:
                if self.max_leaves is not None and tree.size > 1 and n_speculative * tree.n_leaves > self.max_leaves:
                    continue
                seconds = self.cost.step(n_rows, tree.size) + (self.cost.heads(n_speculative) if tree.size > 1 else 0.0)
                rate = (n_speculative * expected + (n_rows - n_speculative)) / seconds
                if tree.size > 1:
                    rate /= 1 + SPECULATION_MARGIN
                if rate > best_rate:
                    best, best_rate = tree, rate
            self._memo[key] = best
        return self._memo[key]


def calibrate(runner: Runner, heads: MedusaHeads | None, max_batch: int, max_tree: int = 64, repeats: int = 5,
              max_tokens: int | None = None) -> CostModel:
    """Time real verification passes for 1, 2, 3, 4, 8, ... tokens (rows of up to `max_tree` tokens).

    The sizes are timed in interleaved rounds and each keeps its median, so a burst of load from
    elsewhere on the machine does not make one size look dear (small sizes decide whether a short
    chain pays at all). On a CPU the cost is close to linear past a few hundred tokens, so points stop
    at 256 (the model extrapolates and the engine corrects it online from real steps); on a GPU at 1024.
    """
    if max_tokens is None:
        max_tokens = 1024 if str(runner.device).startswith("cuda") else 256
    sizes = [1, 2, 3] + [n for n in (2 ** i for i in range(2, 16)) if n <= min(max_batch * max_tree, max_tokens)]
    slots: list[int] = []
    try:
        points = _time_sizes(runner, slots, sizes, max_tree, repeats)
        rows_shapes = _time_full_batches(runner, slots, max_batch, repeats) if max_batch > 1 else {}
        heads_cost = _time_heads(runner, heads, max_batch, repeats) if heads is not None else {}
    finally:
        for s in slots:
            runner.free(s)
    log.info("cost model: %s, heads %s", {k: round(v, 4) for k, v in points.items()},
             {k: round(v, 4) for k, v in heads_cost.items()})
    model = CostModel(points, heads_cost or 0.0)
    model.measured.update({(1, n): points[n] for n in (1, 2, 3, 4) if n in points})
    model.measured.update(rows_shapes)
    return model


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of fn after one untimed warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return sorted(runs)[len(runs) // 2]


def _grow_slots(runner: Runner, slots: list[int], n: int) -> None:
    """Allocate slots (each with a 64-token prefix) until there are `n`."""
    while len(slots) < n:
        slot = runner.alloc()
        runner.prefill({slot: [1] * 64})
        slots.append(slot)


def _time_sizes(runner: Runner, slots: list[int], sizes: list[int], max_tree: int, repeats: int) -> dict[int, float]:
    """Seconds per verification of n tokens (rows of up to max_tree), timed in interleaved rounds."""
    shapes = {}
    for n in sizes:
        rows = max(1, -(-n // max_tree))
        _grow_slots(runner, slots, rows)
        shapes[n] = [TreeInput(s, chain(n // rows - 1), [1] * (n // rows)) for s in slots[:rows]]
    for n in sizes:  # warm-up
        runner.verify(shapes[n])
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            t0 = time.perf_counter()
            runner.verify(shapes[n])
            times[n].append(time.perf_counter() - t0)
    return {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}


def _time_full_batches(runner: Runner, slots: list[int], max_batch: int, repeats: int) -> dict[tuple[int, int], float]:
    """Full batches of short trees (what the policy weighs under load): many rows of a few tokens cost
    more than one row of as many tokens, so these shapes are timed as they are."""
    _grow_slots(runner, slots, max_batch)
    out = {}
    for per_row in (1, 2, 3, 4):
        batch = [TreeInput(s, chain(per_row - 1), [1] * per_row) for s in slots[:max_batch]]
        out[(max_batch, per_row)] = _median_seconds(lambda batch=batch: runner.verify(batch), repeats)
    return out


def _time_heads(runner: Runner, heads: MedusaHeads, max_batch: int, repeats: int) -> dict[int, float]:
    """Seconds per heads call (top-k proposals) for 1 row and for a full batch."""
    out = {}
    for rows in sorted({1, max_batch}):
        hidden = torch.zeros(rows, heads.hidden_size, dtype=runner.dtype, device=runner.device)
        out[rows] = _median_seconds(lambda hidden=hidden: heads.topk(hidden, runner.lm_head, TOPK), repeats)
    return out
