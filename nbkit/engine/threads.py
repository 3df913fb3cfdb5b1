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


class EngineThread:
    """The engine's own thread: prepare() once, then step() while there is work; stop, drain, die loudly.

    The Engine (engine.py) provides prepare(), step(), _finish_all() and the state used here:
    _cond (guards waiting/active), waiting, active, dead, runner, counters, max_restarts, _crashes,
    restart_delay. A crash is supervised: the requests held are answered (503), the runner is reset and
    the loop restarts after a back-off.
    """

    _thread: threading.Thread | None = None
    _stopping = False

    def _init_thread(self, max_restarts: int | None) -> None:
        self._cond = threading.Condition()  # guards waiting and active
        self._thread = None
        self._stopping = False
        self.dead: str | None = None  # why the engine thread died (while it waits to restart, too)
        # The supervisor: a crashed loop fails the requests it held (503), resets the runner and restarts,
        # waiting RESTART_DELAY doubled per recent crash. None = always restart; 0 = stay dead.
        self.max_restarts = max_restarts
        self._crashes: list[float] = []
        self.restart_delay = 0.0  # the last back-off

    def start(self, timeout: float = 600.0):
        """Start the engine thread; it calibrates (adaptive speculation) before serving.

        All of the engine's torch work runs in that one thread: with OpenMP, a second thread that runs
        multi-threaded ops makes both slower, see threads.py.
        """
        self._stopping = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nbkit-engine", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self.dead:
            raise EngineStopped(self.dead)
        return self

    def stop(self, timeout: float = 10.0, drain: bool = False) -> None:
        """Stop the thread. drain=True lets running requests finish first (up to `timeout`)."""
        if drain:
            deadline = time.monotonic() + timeout
            while (self.active or self.waiting) and time.monotonic() < deadline and self.alive:
                time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._finish_all(FinishReason.CANCELLED, "the engine stopped")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def _loop(self) -> None:
        try:
            self.prepare()
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
                self.counters["crashes"] += 1
                delay = self._backoff()
                if delay is not None:
                    self.dead += f" (restarting in {delay:.1f} s)"
                self._finish_all(FinishReason.ERROR, self.dead, error_type="unavailable")
                if delay is None or not self._restart_after(delay):
                    return

    def _serve(self) -> None:
        """step() while there is work, until stop()."""
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.active:
                    self._cond.wait(0.1)
                if self._stopping:
                    return
            self.step()

    def _backoff(self) -> float | None:
        """Seconds to wait before restarting after a crash (doubling per crash within CRASH_WINDOW);
        None = stay dead (out of restarts)."""
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
        if self.max_restarts is not None and self.counters["restarts"] >= self.max_restarts:
            return None
        self.restart_delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (len(self._crashes) - 1))
        return self.restart_delay

    def _restart_after(self, delay: float) -> bool:
        """Reset the runner and wait out the back-off; False = stay dead (stopping, or the reset failed)."""
        try:
            old = self.runner
            fresh = getattr(old, "fresh", None)
            if fresh is not None:  # a clean KV cache: the crash may have left slots half-written
                # The old KV cache goes first (a second one may not fit the card); the old runner keeps its
                # model for fresh() to share, and lets go of it after.
                _call_if_present(old, "close_context")
                self.runner = fresh()
                _call_if_present(old, "close")
        except BaseException:
            log.exception("the runner could not be reset: the engine stays dead")
            return False
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, timeout=delay)
            if self._stopping:
                return False
            self.counters["restarts"] += 1
            self.dead = None
        log.warning("engine restarted (restart %d)", self.counters["restarts"])
        return True


def _call_if_present(obj, name: str) -> None:
    method = getattr(obj, name, None)
    if method is not None:
        method()
