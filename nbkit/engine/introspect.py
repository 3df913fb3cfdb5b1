"""What the engine shows of itself: its limits, its counters and statistics, its per-step hook.

The server, the metrics, the notebook helpers and the benchmarks read these; none of it schedules.
Plain functions of an Engine (engine.py), whose limits() and snapshot() call them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..medusa.trees import MedusaTree
from .runner import runner_member

log = logging.getLogger("nbkit.engine")


@dataclass(frozen=True)
class EngineLimits:
    """What a server may promise its clients (the server reads these, never the runner or the policy)."""

    max_total_tokens: int  # prompt + max_tokens, after the room kept for the largest tree
    max_batch: int
    max_queue: int
    speculation: str  # "adaptive", "fixed" or "off"
    heads: int | None  # Medusa heads (None: no heads)
    # llama.cpp: {"mode": "exact" or "fast", "guarantee" and "mode_reason" in words, "kv_cells"}; None: no modes
    numerics: dict | None = None
    self_check: dict | None = None  # the start-up self-check (selfcheck.SelfCheck.to_dict); None: not run
    calibration: str = "none"  # where the tree prices come from: measured, cached, declared, measuring or none
    calibration_progress: float | None = None  # while measuring (calibration while serving): the share done


def new_counters() -> dict:
    """The engine's counters, all at zero (snapshot() reports them with the live state)."""
    return {"steps": 0, "tokens": 0, "finished": 0, "cancelled": 0, "errors": 0, "rejected": 0,
            "prefill_tokens": 0, "step_seconds": 0.0, "spec_steps": 0, "spec_tokens": 0,
            "restarts": 0, "crashes": 0}


def limits(engine) -> EngineLimits:
    """What `engine` may promise its clients."""
    return EngineLimits(engine.runner.max_context - engine.tree_reserve, engine.max_batch, engine.max_queue,
                        engine.speculation.mode, engine.heads.n_heads if engine.heads is not None else None,
                        runner_member(engine.runner, "numerics"),
                        engine.self_check.to_dict() if engine.self_check is not None else None,
                        engine.speculation.costs_source, engine.speculation.calibration_progress())


def snapshot(engine) -> dict:
    """Counters, the speculation choice and acceptance statistics (the server turns these into metrics)."""
    c = dict(engine.counters)
    return {
        **c,
        "running": len(engine.active), "waiting": len(engine.waiting),
        **kv_use(engine),
        "mean_accepted_per_spec_step": c["spec_tokens"] / c["spec_steps"] if c["spec_steps"] else 0.0,
        **engine.speculation.snapshot(),
        **engine.prefix.snapshot(),
    }


def kv_use(engine) -> dict:
    """KV cells held now (running requests' prefilled prompt and output, finished ones' kept for reuse, plus cells
    a runner parks), the cells there are (a shared cache's `kv_cells`, else every slot's `max_context`) and the
    bytes allocated (0 when the runner does not say)."""
    held = sum(r.n_prefilled + len(r.output_ids) for r in list(engine.active))  # a copy: other threads read
    held += engine.prefix.held_tokens()
    cells = runner_member(engine.runner, "kv_cells")
    total = cells if cells is not None else engine.runner.max_slots * engine.runner.max_context
    kv_bytes = runner_member(engine.runner, "kv_bytes")
    return {"kv_used_tokens": held + runner_member(engine.runner, "kv_parked"), "kv_total_tokens": total,
            "kv_bytes": kv_bytes() if kv_bytes is not None else 0}


def report_step(on_step: Callable[[dict], None] | None, batch: int, chosen: MedusaTree, seconds: float,
                tokens: int) -> None:
    """Call the metrics hook with one decoding step (a failing hook never stops the engine)."""
    if on_step is None:
        return
    try:
        on_step({"batch": batch, "tree": chosen.name, "tree_size": chosen.size, "seconds": seconds, "tokens": tokens})
    except Exception:
        log.exception("the on_step hook failed")
