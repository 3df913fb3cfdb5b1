"""The static-batching baseline, kept out of the Engine's hot path.

The design this project started from: a padded batch. A finished request's row stays in the batch,
computed and thrown away every step, until the longest request of the batch is done; new work waits
for the whole batch to end. `python -m nbkit bench` runs it next to continuous batching: the same Engine,
given this admission strategy.
"""

from __future__ import annotations

from ..engine.request import FinishReason, Request
from ..engine.runner import Runner, TreeInput
from ..medusa.trees import chain


class StaticAdmission:
    """Admits a new batch only when the previous one is done; a finished request's row keeps computing."""

    def __init__(self):
        self.rows: dict[int, int] = {}  # slot of a finished request -> the token its row keeps computing

    def admits(self, active: list[Request]) -> bool:
        return not active

    def keeps_slot(self, r: Request, reason: FinishReason) -> bool:
        if reason.completed and r.pending is not None:
            self.rows[r.slot] = r.pending  # the padded batch goes on computing this row
            return True
        return False

    def padding(self) -> list[TreeInput]:
        return [TreeInput(slot, chain(0), [token]) for slot, token in self.rows.items()]

    def pad_commits(self, commits: dict[int, list[int]], runner: Runner, limit: int) -> dict[int, list[int]]:
        """Padding rows keep their KV in step with the batch while the context has room."""
        for slot in list(self.rows):
            if runner.length(slot) + 1 < limit:
                commits[slot] = [0]
            else:
                del self.rows[slot]
                runner.free(slot)
        return commits

    def end_step(self, active: list[Request], runner: Runner) -> None:
        if self.rows and not active:  # the batch is over: its rows go back
            for slot in self.rows:
                runner.free(slot)
            self.rows.clear()

