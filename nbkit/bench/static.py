"""The static-batching baseline, kept out of the Engine's hot path.

The design this project started from: a padded batch. A finished request's row stays in the batch,
computed and thrown away every step, until the longest request of the batch is done; new work waits
for the whole batch to end. `python -m nbkit bench` runs it next to continuous batching.
"""

from __future__ import annotations

from ..engine.engine import Engine
from ..engine.request import Request
from ..engine.runner import SlotOutput, TreeInput
from ..medusa.trees import chain


class StaticBatchingEngine(Engine):
    """An Engine that admits a new batch only when the previous one is done, and pads finished rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.padding: dict[int, int] = {}  # slot of a finished request -> the token its row keeps computing

    def step(self) -> None:
        super().step()
        if self.padding and not self.active:  # the batch is over: its rows go back
            for slot in self.padding:
                self.runner.free(slot)
            self.padding.clear()

    def _admits_new_work(self) -> bool:
        return not self.active

    def _release_slot(self, r: Request, reason: str) -> None:
        if reason.completed and r.pending is not None:
            self.padding[r.slot] = r.pending  # the padded batch goes on computing this row
        else:
            super()._release_slot(r, reason)

    def _verify(self, inputs: list[TreeInput]) -> dict[int, SlotOutput]:
        return super()._verify(inputs + [TreeInput(slot, chain(0), [token]) for slot, token in self.padding.items()])

    def _commit(self, commits: dict[int, list[int]]) -> None:
        """Padding rows keep their KV in step with the batch while the context has room."""
        limit = self.runner.max_context - self.tree_reserve
        for slot in list(self.padding):
            if self.runner.length(slot) + 1 < limit:
                commits[slot] = [0]
            else:
                del self.padding[slot]
                self.runner.free(slot)
        super()._commit(commits)
