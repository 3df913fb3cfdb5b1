"""One log line per finished generation request, as TGI and vLLM write: where the time went.

Logger "nbkit.requests", key=value pairs. Only the route and numbers: never the prompt, the output or a key
(the line is built from a Finished's counts and timings, and the route's path, nothing else).
"""

from __future__ import annotations

import logging
import sys

from ..engine.request import Finished

log = logging.getLogger("nbkit.requests")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"


def request_line(route: str, fin: Finished) -> str:
    """The line for `fin`, answered on `route`. tok_s: completion tokens over the whole latency (queue
    included, as a client sees it); tokens_per_step: tokens per decoding step (Medusa's speed-up, 1.0 plain)."""
    return (f"route={route} finish={fin.finish_reason.value} prompt_tokens={fin.prompt_tokens} "
            f"cached_tokens={fin.cached_tokens} completion_tokens={fin.completion_tokens} "
            f"queue={_seconds(fin.queue_time)} ttft={_seconds(fin.time_to_first_token)} "
            f"total={_seconds(fin.latency)} tok_s={fin.tokens_per_s:.1f} tokens_per_step={fin.mean_accepted:.2f}")


def log_request(route: str, fin: Finished) -> None:
    log.info(request_line(route, fin))


class ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are when a line is written: a notebook's cell output and
    pytest's capture replace them, and a handler holding the old stream would write to a closed one."""

    def __init__(self, which: str):
        self.which = which
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.<which>


def show_logs(level: str = "info", which: str = "stderr") -> None:
    """Print nbkit's log lines (one per finished request, the engine's periodic line) on sys.<which>, beside
    uvicorn's. Calling it again replaces the handler (a re-run notebook cell prints each line once)."""
    logger = logging.getLogger("nbkit")
    for old in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(old)
    handler = ConsoleHandler(which)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
