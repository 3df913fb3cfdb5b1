"""What the engine shows of itself: its limits, its counters and statistics, its per-step hook.

The server, the metrics, the notebook helpers and the benchmarks read these; none of it schedules.
The Engine (engine.py) mixes this in and provides the state read here: runner, tree_reserve,
max_batch, max_queue, heads, policy, stats, active, waiting, counters and on_step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..medusa.trees import MedusaTree

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


def new_counters() -> dict:
    """The engine's counters, all at zero (snapshot() reports them with the live state)."""
    return {"steps": 0, "tokens": 0, "finished": 0, "cancelled": 0, "errors": 0, "rejected": 0,
            "prefill_tokens": 0, "step_seconds": 0.0, "spec_steps": 0, "spec_tokens": 0,
            "restarts": 0, "crashes": 0}


class EngineIntrospection:
    """limits(), snapshot() and the on_step metrics hook of the Engine."""

    counters: dict
    on_step: Callable[[dict], None] | None = None  # metrics hook, called from the engine thread

    def limits(self) -> EngineLimits:
        return EngineLimits(self.runner.max_context - self.tree_reserve, self.max_batch, self.max_queue,
                            self.speculation.mode, self.heads.n_heads if self.heads is not None else None,
                            getattr(self.runner, "numerics", None),
                            self.self_check.to_dict() if getattr(self, "self_check", None) is not None else None)

    def snapshot(self) -> dict:
        """Counters, the speculation choice and acceptance statistics (the server turns these into metrics)."""
        c = dict(self.counters)
        return {
            **c,
            "running": len(self.active), "waiting": len(self.waiting),
            "mean_accepted_per_spec_step": c["spec_tokens"] / c["spec_steps"] if c["spec_steps"] else 0.0,
            **self.speculation.snapshot(),
        }

    def _report_step(self, batch: int, chosen: MedusaTree, seconds: float, tokens: int) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step({"batch": batch, "tree": chosen.name, "tree_size": chosen.size,
                          "seconds": seconds, "tokens": tokens})
        except Exception:  # metrics must never stop the engine
            log.exception("the on_step hook failed")
