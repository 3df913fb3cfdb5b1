"""Load-adaptive speculation: which tree each step, from measured costs and measured acceptance.

Throughput of a step = tokens it emits / time it takes. With B running requests of which S speculate,
verifying a tree of T nodes costs cost(B x T) (rows are padded to the largest tree) plus the heads on
S rows, and emits on average sum over the S requests of E_i(tree) plus B - S tokens, where
    E_i(tree) = 1 + sum over the tree's paths p of P_i(p accepted),
    P_i(p)    = prod over depths d of q_i[d][p_d],
and q_i[d][r] is request i's probability that, having accepted up to depth d, the walk moves into
the rank-r candidate of head d. q_i is the LOWER confidence bound of the request's own estimate shrunk
toward the running global one (estimates.py), so the policy prices the gain it can count on, not the
gain it hopes for. It picks the tree (none, or the best sub-tree of the published tree with n nodes)
whose rate beats plain decoding by SPECULATION_MARGIN; a request whose own bound promises too little
runs without a tree while the others speculate. On a GPU, where 64 tokens cost about as much as 1, it
picks big trees; on a CPU under load small ones or none.

Two checks run on top (guard.py): the guard compares the realized rate of speculative steps with
measured plain steps and backs off when speculation loses; and when real step times drift from the
cost model, a few interleaved rounds of plain and tree steps re-measure it. The cost model gives the
policy its guard and says when it has drifted, so a declared price list (`DeclaredCostModel`, from
`CostModel.from_function`), which never drifts and whose guard never intervenes, is taken as given with
no special case here. `calibrate()` (calibration.py) measures the cost curve on the runner.
The engine never talks to this class: `Speculation` (speculation.py) owns it with the statistics and costs.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ...medusa.trees import MedusaTree, chain, subtree
from .costs import CostModel
from .estimates import AcceptanceStats, RequestAcceptance, TreeTable, shrunk_lower_bounds
from .guard import Remeasure

log = logging.getLogger("nbkit.engine")

PROBE_EVERY = 8  # steps between acceptance probes for requests that are not speculating
PROBE_BUDGET = 0.01  # share of decoding time the probes may take
SUBTREE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 63)
REMEASURE_SIZES = (1, 2, 4)  # speculated nodes of the sub-trees re-measured on drift (plus the current pick)
REBUILD_EVERY = 256  # steps between rebuilds of the candidate trees from the statistics (a rebuild is dear)
RECHOOSE_EVERY = 16  # steps the step prices of a batch size are reused (pricing every candidate is not free)
# The lower bound of a tree's rate must beat no speculation by this much: the prices are estimates too
# (a shape that has not run yet is read off the 1-row curve, and the machine is noisy).
SPECULATION_MARGIN = 0.05
# In a batch, a request's tree rides on the padded width the others pay for; it must still promise this
# many extra tokens per step (lower bound) to be worth its heads row and its acceptance walk.
MIN_REQUEST_GAIN = 0.15


class SpeculationPolicy:
    """Chooses the tree for the next step. mode: 'adaptive', 'off', or 'fixed' (with `fixed`)."""

    def __init__(self, base_tree: MedusaTree, stats: AcceptanceStats, cost: CostModel,
                 mode: str = "adaptive", fixed: MedusaTree | None = None, max_leaves: int | None = None,
                 recomputes_accepted: bool = False):
        self.base_tree, self.stats, self.mode, self.fixed = base_tree, stats, mode, fixed
        self.cost, self.guard = cost, cost.guard()  # a cost model comes with the guard that checks it
        self.max_leaves = max_leaves  # total leaf budget per step (llama.cpp sequence ids), None = no limit
        # The runner decodes accepted speculative tokens again next step (llama.cpp exact mode): a tree's price
        # includes them.
        self.recomputes_accepted = recomputes_accepted
        self.none = chain(0)
        self._trees: list[MedusaTree] = []
        self._table: TreeTable | None = None
        self._table_version = self._global_version = self._global_age = 0
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None  # the global (q, trials) read last
        self._refresh_in = 0
        self._prices: dict[int, list[float]] = {}  # rows -> seconds per candidate tree (heads excluded)
        self._reach: dict[int, set[int]] = {}  # rows -> candidates that could pay (see _reachable)
        self._prices_age, self._prices_version = 0, -1
        self.remeasure = Remeasure()
        self.steps = 0
        self._remeasuring = False
        self.last_choice = self.none
        self.choices: dict[str, int] = {}
        # Per request: (cache key, gains row); weak, so a finished request's row goes with it.
        self._gains_rows: weakref.WeakKeyDictionary[RequestAcceptance, tuple[tuple, list[float]]] = (
            weakref.WeakKeyDictionary())

    def use_costs(self, model: CostModel) -> None:
        """Price with `model` from now on, checked by a fresh guard of its kind (after calibration)."""
        self.cost, self.guard = model, model.guard()
        self._prices.clear()
        self._reach.clear()

    def candidates(self) -> list[MedusaTree]:
        """[none, best sub-trees of the base tree by size], rebuilt from the statistics every REBUILD_EVERY steps."""
        if self._refresh_in <= 0 or not self._trees:
            scores = self.stats.path_scores(self.base_tree)
            self._trees = [self.none] + [subtree(self.base_tree, scores, n)
                                         for n in SUBTREE_SIZES if n <= len(self.base_tree.paths)]
            self._table = TreeTable(self.base_tree, self._trees, self.stats.n_heads, self.stats.topk)
            self._table_version += 1
            self._refresh_in = REBUILD_EVERY
            self._prices.clear()
            self._reach.clear()
        self._refresh_in -= 1
        return self._trees

    def probe_due(self, step: int, n_active: int) -> bool:
        """While no tree runs, the heads still look ahead now and then so the acceptance statistics
        stay current; probes are spaced by the heads' measured cost so they stay a small part of decoding
        (a quarter of that where no tree could pay even at the point estimate of acceptance)."""
        if self.mode != "adaptive":
            return False
        every = PROBE_EVERY
        if self.cost.heads_cost > 0:
            step_cost = max(self.cost(n_active), 1e-6)
            budget = PROBE_BUDGET if self._reachable(max(n_active, 1)) else PROBE_BUDGET / 4
            every = max(PROBE_EVERY, round(self.cost.heads(n_active) / step_cost / budget))
        return step % every == 0

    def choose(self, n_rows: int, n_speculative: int) -> MedusaTree:
        """The model's pick for requests that have seen nothing of their own yet (no guard, no re-measure)."""
        if self.mode == "off" or n_speculative == 0:
            return self._record(self.none)
        if self.mode == "fixed":
            return self._record(self.fixed)
        self._age_prices()
        return self._record(self._best(n_rows, [None] * n_speculative)[0])

    def plan(self, n_rows: int, requests: list[RequestAcceptance | None]) -> tuple[MedusaTree, list[bool]]:
        """The tree for this step and which of the speculation-eligible `requests` run it (the others and
        the rest of the batch run a root-only tree)."""
        self._remeasuring = False
        if self.mode == "off" or not requests:
            return self._record(self.none), [False] * len(requests)
        if self.mode == "fixed":
            return self._record(self.fixed), [True] * len(requests)
        self.remeasure.maybe_start(self.steps, self.cost, lambda: self._remeasure_trees(n_rows))
        if self.remeasure.active:
            tree, self._remeasuring = self.remeasure.next_tree(), True
            return self._record(tree), [tree.size > 1] * len(requests)
        self._age_prices()
        # (No shortcut on _reachable here: a request the heads know well may pay where the global estimate
        # does not, and only _best weighs each request's own evidence.)
        if not self.guard.allows(self.steps) or self.guard.wants_plain(self.steps, n_rows):
            return self._record(self.none), [False] * len(requests)
        tree, use = self._best(n_rows, requests)
        return self._record(tree), use

    def record_step(self, n_rows: int, tree_size: int, verify_seconds: float, seconds: float, tokens: int,
                    probed: bool, carried: int = 0) -> None:
        """What a step really did (the engine calls this after every decoding step): feeds the guard and
        the re-measurement. tree_size: the largest tree in the step; seconds: heads to commit; carried:
        tokens accepted last step that this step decoded again (a runner that recomputes them)."""
        self.steps += 1
        if self.mode != "adaptive":
            return
        if self._remeasuring:
            if not carried:  # a step that also paid for the last one's tokens is not the shape it claims
                self.remeasure.record(n_rows, tree_size, verify_seconds, self.cost)
            if tree_size > 1:
                return
        if tree_size > 1 and self.last_choice.size == 1:
            return  # a request's own fixed tree ran, not the policy's choice: neither side of the guard
        # The recomputed tokens are speculation's cost: the step that pays for them counts on its side.
        self.guard.record(self.steps, n_rows, tree_size > 1 or carried > 0, tokens, seconds, probed)

    def snapshot(self) -> dict:
        return {**self.guard.snapshot(), "remeasurements": self.remeasure.count}

    def _record(self, tree: MedusaTree) -> MedusaTree:
        self.last_choice = tree
        self.choices[tree.name] = self.choices.get(tree.name, 0) + 1
        return tree

    def _remeasure_trees(self, n_rows: int) -> list[MedusaTree]:
        """Plain decoding and the small trees that could pay at all: a tree whose price over plain exceeds the
        tokens it yields at the point estimate of acceptance is not re-measured (drift moves every price by
        the re-measured ones' median ratio, so it would stay out of reach, and every step of it loses)."""
        reach = self._reachable(n_rows)
        picked = [t for c, t in enumerate(self._trees) if len(t.paths) in REMEASURE_SIZES and c in reach]
        if self.last_choice.size > 1 and self.last_choice.name not in {t.name for t in picked}:
            picked.append(self.last_choice)
        return [self.none] + picked

    def _reachable(self, n_rows: int) -> set[int]:
        """Candidates that beat plain decoding for n_rows at the point estimate of acceptance (every row
        speculating, heads not counted): the optimistic side, refreshed with the step prices."""
        trees = self._trees or self.candidates()
        if n_rows not in self._reach:
            q, _ = self.stats.counts()
            expected = self._table.expected(q.nan_to_num(0.0)[None])[0].tolist()
            plain = self.cost.step(n_rows, 1)
            self._reach[n_rows] = {c for c, t in enumerate(trees) if c > 0 and expected[c] * plain
                                   > self._price(n_rows, t, n_rows * (expected[c] - 1.0))}
        return self._reach[n_rows]

    def _age_prices(self) -> None:
        """Step prices and reachability are reused for RECHOOSE_EVERY plans, or until the cost model changes."""
        self._prices_age += 1
        if self._prices_age >= RECHOOSE_EVERY or self._prices_version != self.cost.version:
            self._prices.clear()
            self._reach.clear()
            self._prices_age, self._prices_version = 0, self.cost.version

    def _step_prices(self, n_rows: int) -> list[float]:
        """Seconds of a step of n_rows for every candidate tree (see _age_prices)."""
        if n_rows not in self._prices:
            self._prices[n_rows] = [self.cost.step(n_rows, t.size) for t in self._trees]
        return self._prices[n_rows]

    def _gains(self, requests: list[RequestAcceptance | None]) -> list[list[float]]:
        """Per request, the lower bound of the extra tokens per step of every candidate tree. The global
        estimate is read every RECHOOSE_EVERY steps; a request's row is recomputed only when it or that
        read changed (one tensor pass for all stale rows)."""
        self._global_age += 1
        if self._global is None or self._global_age >= RECHOOSE_EVERY:
            self._global, self._global_age = self.stats.counts(), 0
            self._global_version += 1
        key = (self._global_version, self._table_version)
        cache = self._gains_rows
        stale = [i for i, r in enumerate(requests)
                 if r is None or r not in cache or cache[r][0] != (key, r.version)]
        if stale:
            rows = (self._table.expected(shrunk_lower_bounds(*self._global, [requests[i] for i in stale])) - 1.0)
            for i, row in zip(stale, rows.tolist()):
                if requests[i] is None:
                    return [row] * len(requests)  # nothing of their own: all the same
                cache[requests[i]] = ((key, requests[i].version), row)
        return [cache[r][1] for r in requests]

    def _best(self, n_rows: int, requests: list[RequestAcceptance | None]) -> tuple[MedusaTree, list[bool]]:
        """The candidate with the most tokens per second at the requests' lower bounds, if it beats plain
        decoding by SPECULATION_MARGIN; else no tree."""
        trees = self.candidates()
        gains = self._gains(requests)
        prices = self._step_prices(n_rows)
        heads_row = self.cost.heads(len(requests)) / len(requests)
        best, best_use = self.none, [False] * len(requests)
        best_rate = n_rows / prices[0] * (1 + SPECULATION_MARGIN)
        for c in range(1, len(trees)):
            # a request speculates when its bound pays for its heads row (at this batch's rate)
            floor = heads_row * n_rows / prices[c] + (MIN_REQUEST_GAIN if n_rows > 1 else 0.0)
            use = [g[c] > floor for g in gains]
            k = sum(use)
            if k == 0 or (self.max_leaves is not None and k * trees[c].n_leaves > self.max_leaves):
                continue
            gain = sum(g[c] for g, u in zip(gains, use) if u)
            rate = (n_rows + gain) / (prices[c] + self._carry_price(n_rows, trees[c], gain) + self.cost.heads(k))
            if rate > best_rate:
                best, best_use, best_rate = trees[c], use, rate
        return best, best_use

    def _carry_price(self, n_rows: int, tree: MedusaTree, gain: float) -> float:
        """Seconds of decoding the `gain` accepted tokens again next step, on a runner that recomputes them."""
        if not self.recomputes_accepted or gain <= 0:
            return 0.0
        base = n_rows * tree.size
        return max(0.0, self.cost(base + gain) - self.cost(base))

    def _price(self, n_rows: int, tree: MedusaTree, gain: float) -> float:
        """Seconds of a step of n_rows with `tree`, including the recomputed tokens of `gain` accepted ones."""
        return self.cost.step(n_rows, tree.size) + self._carry_price(n_rows, tree, gain)
