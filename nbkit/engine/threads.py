"""Keeping torch's CPU work in one thread.

With GNU OpenMP, once a thread has run a multi-threaded op, its OpenMP pool stays; a second thread
that then runs ops gets its own pool, libgomp sees more threads than cores and stops spinning
between ops, and every small op (a batch-1 GEMV, attention) pays a futex wake-up (figures in
docs/measurements.md). So the engine loads in a short-lived thread (whose pool dies with it) and does all its torch
work in its own thread; the caller's thread (a notebook kernel, uvicorn's) never starts a pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .request import EngineStopped, FinishReason
from .runner import runner_member
from .speculation import Calibrate
from .warmup import warm_up, warming_up

log = logging.getLogger("nbkit.engine")

T = TypeVar("T")

RESTART_DELAY = 0.5  # seconds before the first restart after a crash; doubles per crash within CRASH_WINDOW
MAX_RESTART_DELAY = 30.0
CRASH_WINDOW = 60.0


def in_fresh_thread(fn: Callable[..., T], *args) -> T:
    """Run fn(*args) in a new thread, wait for it, return its result or raise its exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # re-raised in the caller
            box["error"] = err

    t = threading.Thread(target=run, name="nbkit-load", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class EngineLoop:
    """The engine's own thread: prepare() once, then step() while there is work; stop, drain, die loudly.

    It drives an Engine (engine.py) through prepare(), step(), finish_all(), its `cond` (which guards its
    waiting and active requests), its runner and its counters. A crash is supervised: the requests held are
    answered (503), the runner is reset and the loop restarts after a back-off.
    """

    def __init__(self, engine, max_restarts: int | None):
        self.engine = engine
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.dead: str | None = None  # why the engine thread died (while it waits to restart, too)
        # The supervisor: a crashed loop fails the requests it held (503), resets the runner and restarts,
        # waiting RESTART_DELAY doubled per recent crash. None = always restart; 0 = stay dead.
        self.max_restarts = max_restarts
        self._crashes: list[float] = []
        self.restart_delay = 0.0  # the last back-off
        self._ready = threading.Event()

    @property
    def started(self) -> bool:
        """start() was called: the thread, not the caller, drives the steps."""
        return self.thread is not None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.dead is None

    def refusal(self) -> str | None:
        """Why new requests cannot be served now (None: they can)."""
        if self.dead or (self.thread is not None and not self.thread.is_alive()) or self.stopping:
            return self.dead or "the engine is not running"
        return None

    def start(self, timeout: float = 600.0) -> None:
        """Start the engine thread; it calibrates (adaptive speculation) before serving.

        All of the engine's torch work runs in that one thread: with OpenMP, a second thread that runs
        multi-threaded ops makes both slower (see the top of this module).
        """
        self.stopping = False
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nbkit-engine", daemon=True)
        self.thread.start()
        self._ready.wait(timeout)
        if self.dead:
            raise EngineStopped(self.dead)

    def stop(self, timeout: float = 10.0, drain: bool = False) -> None:
        """Stop the thread. drain=True lets running requests finish first (up to `timeout`)."""
        engine = self.engine
        if drain:
            deadline = time.monotonic() + timeout
            while (engine.active or engine.waiting) and time.monotonic() < deadline and self.alive:
                time.sleep(0.02)
        with engine.cond:
            self.stopping = True
            engine.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
        engine.finish_all(FinishReason.CANCELLED, "the engine stopped")

    def _run(self) -> None:
        try:
            self.engine.prepare(while_serving=self.engine.calibrate is Calibrate.WHILE_SERVING)
        except BaseException as err:
            self.dead = f"engine start-up failed: {type(err).__name__}: {err}"
            log.exception("engine start-up failed")
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                self._serve()
                return
            except BaseException as err:  # nobody may wait forever: fail what we hold, then restart or stay dead
                self.dead = f"engine thread died: {type(err).__name__}: {err}"
                log.exception("engine thread died")
                self.engine.counters["crashes"] += 1
                delay = self._backoff()
                if delay is not None:
                    self.dead += f" (restarting in {delay:.1f} s)"
                self.engine.finish_all(FinishReason.ERROR, self.dead, error_type="unavailable")
                if delay is None or not self._restart_after(delay):
                    return

    def _serve(self) -> None:
        """step() while there is work, until stop()."""
        engine = self.engine
        while True:
            with engine.cond:
                while not self.stopping and not engine.waiting and not engine.active:
                    if warming_up(engine):
                        break  # idle time checks the tree and measures forward costs (a first start)
                    engine.cond.wait(0.1)
                if self.stopping:
                    return
                idle = not engine.waiting and not engine.active
            if idle:  # a request that arrives waits for the call in progress, then the warm-up yields
                warm_up(engine, lambda: self.stopping or bool(engine.waiting))
            else:
                engine.step()

    def _backoff(self) -> float | None:
        """Seconds to wait before restarting after a crash (doubling per crash within CRASH_WINDOW);
        None = stay dead (out of restarts)."""
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
        if self.max_restarts is not None and self.engine.counters["restarts"] >= self.max_restarts:
            return None
        self.restart_delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (len(self._crashes) - 1))
        return self.restart_delay

    def _restart_after(self, delay: float) -> bool:
        """Reset the runner and wait out the back-off; False = stay dead (stopping, or the reset failed)."""
        engine = self.engine
        try:
            old = engine.runner
            fresh = runner_member(old, "fresh")
            if fresh is not None:  # a clean KV cache: the crash may have left slots half-written
                # The old KV cache goes first (a second one may not fit the card); the old runner keeps its
                # model for fresh() to share, and lets go of it after.
                _call_if_present(old, "close_context")
                engine.runner = fresh()
                _call_if_present(old, "close")
        except BaseException:
            log.exception("the runner could not be reset: the engine stays dead")
            return False
        with engine.cond:
            engine.cond.wait_for(lambda: self.stopping, timeout=delay)
            if self.stopping:
                return False
            engine.counters["restarts"] += 1
            self.dead = None
        log.warning("engine restarted (restart %d)", engine.counters["restarts"])
        return True


def _call_if_present(runner, name: str) -> None:
    method = runner_member(runner, name)
    if method is not None:
        method()
