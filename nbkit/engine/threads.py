"""Keeping torch's CPU work in one thread.

Measured on the 2-core CI machines (torch 2.13 CPU, GNU OpenMP): once a thread has run a
multi-threaded op, its OpenMP pool stays; a second thread that then runs ops gets its own pool,
libgomp sees more threads than cores and stops spinning between ops, and every small op (a batch-1
GEMV, attention) pays a futex wake-up: 127 vs 34 us per 1x576x1536 GEMV, 52 vs 31 ms per SmolLM2
token. So the engine loads in a short-lived thread (whose pool dies with it) and does all its torch
work in its own thread; the caller's thread (a notebook kernel, uvicorn's) never starts a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
