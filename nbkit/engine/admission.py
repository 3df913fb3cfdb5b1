"""When a free slot takes new work, and what becomes of a finished request's slot.

The engine's default is continuous batching (`ContinuousAdmission`): a free slot takes new work at every
step and a finished request's slot goes back at once. The static-batching baseline (bench/static.py) is
another admission strategy handed to the same Engine: it admits a batch only when the last one is done,
and keeps finished rows computing padding until then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .request import FinishReason, Request, SamplingParams
from .runner import Runner, TreeInput, runner_member


class Admission(Protocol):
    def admits(self, active: list[Request]) -> bool:
        """Whether free slots take waiting requests this step."""

    def keeps_slot(self, r: Request, reason: FinishReason) -> bool:
        """Called when `r` finishes: True if the strategy keeps its slot (the engine then does not free it)."""

    def padding(self) -> list[TreeInput]:
        """Rows verified beside the running requests' (their outputs are thrown away)."""

    def pad_commits(self, commits: dict[int, list[int]], runner: Runner, limit: int) -> dict[int, list[int]]:
        """The step's commits with the padding rows' (a slot may hold `limit` tokens)."""

    def end_step(self, active: list[Request], runner: Runner) -> None:
        """After every step."""


class ContinuousAdmission:
    """Iteration-level batching: new requests join at the next step, finished ones leave at once."""

    def admits(self, active: list[Request]) -> bool:
        return True

    def keeps_slot(self, r: Request, reason: FinishReason) -> bool:
        return False

    def padding(self) -> list[TreeInput]:
        return []

    def pad_commits(self, commits: dict[int, list[int]], runner: Runner, limit: int) -> dict[int, list[int]]:
        return commits

    def end_step(self, active: list[Request], runner: Runner) -> None:
        return None


def check_fits(prompt_len: int, params: SamplingParams, room: int, runner: Runner) -> None:
    """Raise ValueError when a request cannot fit: its prompt, max_tokens and the `room` kept for its largest
    tree must fit a slot's context, and the KV cells all slots share (a runner with `kv_cells`)."""
    limit = runner.max_context - room
    if prompt_len + params.max_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                         f"context limit of {limit} tokens")
    cells = runner_member(runner, "kv_cells")
    if cells is not None and prompt_len + params.max_tokens + room > cells:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) + the tree's "
                         f"room exceed the {cells} KV cells all requests share")


def cells_free(req: Request, active: list[Request], runner: Runner, room: Callable[[SamplingParams], int],
               held: int = 0) -> bool:
    """Whether `req` fits in a runner whose slots share one KV cache (`kv_cells`) beside the active requests'
    reservations (prompt + max_tokens + room for the largest tree), the cells the runner parks (`kv_parked`) and
    `held` more (finished requests' KV kept for reuse: prefix.py).
    FIFO: the head of the queue waits for cells, and no later request passes it (it would starve a long prompt)."""
    cells = runner_member(runner, "kv_cells")
    if cells is None:
        return True

    def reserved(r: Request) -> int:
        return len(r.prompt_ids) + r.params.max_tokens + room(r.params)

    return sum(map(reserved, active)) + runner_member(runner, "kv_parked") + held + reserved(req) <= cells
