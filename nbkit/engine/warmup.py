"""A first start's work left for idle time (Calibrate.WHILE_SERVING): the engine reports ready once plain decoding
is checked, then, whenever it has no request, checks the tree that will serve (selfcheck.py) and measures the
forward costs that price trees (speculation/calibration.py). Both run in units and yield as soon as a request
waits; until both are done no tree serves (plain decoding is what the check compares against, so it is
lossless without them). Their slots and KV cells come first from finished requests' kept KV, least recently used
first (prefix.py)."""

from __future__ import annotations

from collections.abc import Callable

from .introspect import kv_use
from .selfcheck import finish_self_check


def warming_up(engine) -> bool:
    """Start-up work is left for idle time: the self-check's tree runs, or the calibration."""
    return engine.pending_check is not None or engine.speculation.measuring


def warm_up(engine, should_yield: Callable[[], bool]) -> None:
    """The engine thread, idle: check the tree, then measure, until done or `should_yield()` (a request waits)."""
    check = engine.pending_check
    if check is not None:
        check.runner = engine.runner  # a restarted engine's fresh runner (same model and settings) goes on
        _make_room(engine, check.slots_needed(), check.cells_needed())
        if not finish_self_check(engine, should_yield):
            return
    spec = engine.speculation
    if spec.measuring:
        spec.calibration.runner = engine.runner
        _make_room(engine, spec.calibration.slots_needed(), spec.calibration.cells_needed())
        spec.calibrate_while_idle(lambda: engine.prefix.alloc(engine), should_yield)


def _make_room(engine, slots: int, cells: int) -> None:
    """Evict kept prefixes, least recently used first, until `slots` slots and `cells` KV cells are free."""
    def short() -> bool:
        use = kv_use(engine)
        free_slots = engine.runner.max_slots - len(engine.prefix.retained) - len(engine.active)
        return free_slots < slots or use["kv_total_tokens"] - use["kv_used_tokens"] < cells

    while short() and engine.prefix.evict_lru(engine):
        pass
