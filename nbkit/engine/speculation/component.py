"""Speculation as one component: the only object the engine asks what to speculate and tells what happened.

Every decoding step the engine calls `plan(running)` and gets a StepPlan (which tree each running request
verifies, whether the heads probe), runs it, and calls `record(StepResult)` with what the step did. Inside,
`Speculation` owns the acceptance statistics (estimates.py), the cost model (costs.py, calibrated here at
start-up) and the policy with its guard (policy.py, guard.py); nothing outside this package reaches them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ...medusa.heads import MedusaHeads
from ...medusa.trees import MedusaTree, chain, get_tree
from .calibration import Calibration
from .costs import CostModel
from .estimates import AcceptanceStats, RequestAcceptance
from .policy import SpeculationPolicy

if TYPE_CHECKING:
    from ..request import Request
    from ..runner import Runner

log = logging.getLogger("nbkit.engine")


class CostCache(Protocol):
    """Where an earlier start's calibration is kept (startcache.StartupCache)."""

    path: Path

    def costs(self) -> CostModel | None: ...

    def save_costs(self, model: CostModel) -> None: ...


@dataclass
class StepPlan:
    """What one decoding step verifies (vLLM v1's SchedulerOutput, for speculation only)."""

    chosen: MedusaTree  # the policy's tree this step (chain(0): none)
    trees: dict[int, MedusaTree]  # request id -> the tree it verifies (root-only: plain decoding)
    probe: bool  # the heads look ahead on speculation-eligible requests even where no tree runs

    def heads_rows(self, running: list[Request]) -> list[Request]:
        """The requests whose heads run this step: a tree to fill, or a probe to take."""
        return [r for r in running if r.heads_ready and (self.trees[r.id].size > 1 or
                                                         (self.probe and r.params.speculate))]


@dataclass(frozen=True)
class StepResult:
    """What one decoding step did (the cost model, the guard and the statistics learn from it)."""

    rows: int  # rows verified (the static baseline's padding rows included)
    tree_size: int  # the largest tree in the step (every row is padded to it)
    verify_seconds: float  # forward pass to KV compaction
    seconds: float  # the whole step, heads included
    tokens: int  # tokens emitted
    probed: bool  # the heads ran for a probe (the step is not a plain step's price)
    carried: int = 0  # tokens accepted last step that this step decoded again (a runner that recomputes them)
    proposed: int = 0  # tree tokens sent to verification beyond the roots
    accepted: int = 0  # of those, accepted


class Speculation:
    """Medusa speculation for one engine: mode 'adaptive', 'off', or a fixed tree's name."""

    def __init__(self, heads: MedusaHeads | None, base_tree: str = "mc_sim_7b_63", mode: str = "adaptive",
                 cost_model: CostModel | None = None, max_leaves: int | None = None,
                 recomputes_accepted: bool = False):
        if mode not in ("adaptive", "off") and heads is None:
            raise ValueError(f"speculation {mode!r} needs Medusa heads")
        self.n_heads = heads.n_heads if heads is not None else 0
        self.base_tree = get_tree(base_tree, self.n_heads) if heads is not None else chain(0)
        fixed = None if mode in ("adaptive", "off") else get_tree(mode, self.n_heads)
        if heads is None:
            mode = "off"
        self.stats = AcceptanceStats(max(self.n_heads, 1),
                                     measured=getattr(heads, "config", {}).get("acceptance_q"))
        self.cost_model = cost_model  # None until calibrated (a placeholder prices the policy until then)
        # Where the prices come from: "declared" (given), "measured" (calibrated at this start), "cached" (an
        # earlier start's calibration on this machine), "measuring" (calibrating while serving: plain decoding
        # until it is done), "none" (no trees to price); `calibrations` counts finished runs.
        self.costs_source = "declared" if cost_model is not None else "none"
        self.calibrations = 0
        self.calibration: Calibration | None = None  # the run in progress while serving
        self.trees_checked = True  # False while the self-check's tree runs wait for idle time: no tree serves
        self.cache: CostCache | None = None
        self.policy = SpeculationPolicy(
            self.base_tree, self.stats, cost_model or CostModel({1: 1.0}), mode="fixed" if fixed else mode,
            fixed=fixed, max_leaves=max_leaves, recomputes_accepted=recomputes_accepted)

    # ---- what the engine and its readers see ----------------------------------------------
    @property
    def mode(self) -> str:
        return self.policy.mode

    @property
    def fixed(self) -> MedusaTree | None:
        return self.policy.fixed

    @property
    def choices(self) -> dict[str, int]:
        """Steps per tree name the policy chose so far."""
        return self.policy.choices

    @property
    def last_choice(self) -> MedusaTree:
        return self.policy.last_choice

    def largest_tree(self) -> int:
        """Nodes of the largest tree the engine's own choice may verify."""
        return max(self.base_tree.size, self.fixed.size if self.fixed else 1)

    def tree(self, name: str) -> MedusaTree:
        """A tree a request asks for by name ("none", "chain-2", "mc_sim_7b_63")."""
        return get_tree(name, self.n_heads)

    def turn_off(self) -> None:
        """No more trees (the self-check found speculation wrong on this device); nothing left to measure."""
        self.policy.mode = "off"
        if self.measuring:
            self.calibration, self.costs_source = None, "none"

    def snapshot(self) -> dict:
        last = self.policy.last_choice
        return {"speculation": self.mode, "last_tree": last.name, "last_tree_size": last.size,
                "tree_choices": dict(self.policy.choices), **self.stats.snapshot(), **self.policy.snapshot()}

    # ---- life cycle -------------------------------------------------------------------------
    def prepare(self, runner: Runner, heads: MedusaHeads | None, max_batch: int, cache: CostCache | None,
                while_serving: bool = False) -> None:
        """Adaptive speculation prices trees with the forward cost measured on the runner (or by an earlier start
        on this machine: `cache`, startcache.py): now, or (while_serving) in the engine's idle time, with plain
        decoding until then (`calibrate_while_idle`)."""
        if self.mode != "adaptive" or self.cost_model is not None or self.calibration is not None:
            return
        cached = cache.costs() if cache is not None else None
        if cached is not None:
            self.cost_model, self.costs_source = cached, "cached"
            log.info("cost model: the calibration cached in %s (re-measured on drift)", cache.path)
            self.policy.use_costs(self.cost_model)
            return
        self.cache = cache
        self.calibration = Calibration(runner, heads, max_batch, max_tree=self.base_tree.size)
        if while_serving:
            self.costs_source = "measuring"
            log.info("serving with plain decoding while the forward costs are measured in idle time")
            return
        self.calibration.advance()
        self._calibrated()

    @property
    def measuring(self) -> bool:
        """Calibrating while serving: requests decode plainly (unless they ask for a tree) until it is done."""
        return self.costs_source == "measuring"

    def calibration_progress(self) -> float | None:
        """The share of the calibration done while measuring (None otherwise)."""
        return round(self.calibration.progress(), 3) if self.measuring else None

    def calibrate_while_idle(self, alloc: Callable[[], int], should_yield: Callable[[], bool]) -> None:
        """Go on measuring (the engine is idle) until done or `should_yield()`; price trees once done."""
        if self.measuring and self.calibration.advance(alloc, should_yield):
            self._calibrated()

    def _calibrated(self) -> None:
        if self.measuring:
            log.info("cost model measured while serving (%d pieces, %.1f s of idle time): speculation on",
                     self.calibration.resumes, self.calibration.seconds)
        self.cost_model = self.calibration.cost_model()
        self.costs_source, self.calibrations = "measured", self.calibrations + 1
        if self.cache is not None:
            self.cache.save_costs(self.cost_model)
        self.calibration = None
        self.policy.use_costs(self.cost_model)

    def new_request(self) -> RequestAcceptance:
        """A request's own acceptance counts, empty (it is admitted)."""
        return RequestAcceptance(self.stats.n_heads, self.stats.topk)

    def resolve_probes(self, r: Request, final: bool) -> None:
        """Fold the request's probes whose continuation is known into the statistics."""
        r.probes = self.stats.resolve_probes(r.probes, r.output_ids, final, r.acceptance)

    # ---- every step -------------------------------------------------------------------------
    def plan(self, running: list[Request], n_active: int) -> StepPlan:
        """Each running request's tree: its own if it asked for one, else the policy's pick for the requests
        whose acceptance pays for it; root-only for the rest (and for those whose heads are not ready)."""
        ready = [r for r in running if r.heads_ready and self.n_heads]
        if self.measuring or not self.trees_checked:  # no prices, or the tree not yet checked on this device:
            # plain decoding, except for requests that name their tree once it is checked
            named = {r.id for r in ready if r.params.tree is not None} if self.trees_checked else set()
            trees = {r.id: self.tree(r.params.tree) if r.id in named else chain(0) for r in running}
            return StepPlan(chain(0), trees, False)
        spec = [r for r in ready if r.params.speculate and r.params.tree is None]
        chosen, use = self.policy.plan(len(running), [r.acceptance for r in spec])
        speculating = {r.id for r, u in zip(spec, use) if u} | {r.id for r in ready if r.params.tree is not None}
        trees = {r.id: (chosen if r.params.tree is None else self.tree(r.params.tree)) if r.id in speculating
                 else chain(0) for r in running}
        return StepPlan(chosen, trees, self.policy.probe_due(self.policy.steps, n_active))

    def record(self, result: StepResult) -> None:
        """What the step did: the cost model learns its price, the guard its yield, the statistics its trees."""
        if self.cost_model is not None:  # a step that also decoded last step's accepted tokens has no (rows, T) shape
            self.cost_model.observe(result.rows * result.tree_size + result.carried, result.verify_seconds,
                                    n_rows=None if result.carried else result.rows)
        self.policy.record_step(result.rows, result.tree_size, result.verify_seconds, result.seconds,
                                result.tokens, result.probed, result.carried)
        self.stats.proposed += result.proposed
        self.stats.accepted += result.accepted
