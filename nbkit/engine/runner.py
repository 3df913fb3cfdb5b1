"""The runner contract: the only thing the engine knows about a backend.

The engine decides WHAT runs each step (which slots, which tree each verifies); a runner does the
forward pass for the batch it is handed and keeps each slot's KV cache. Runners know nothing of
requests, sampling or HTTP: token ids in, logits and hidden states out. Two runners implement it:
`torch_runner.TorchRunner` and `llamacpp.runner.LlamaCppRunner`.

A slot is one request's row of KV cache. Its life: `alloc()`, `prefill()` its prompt in chunks,
then every step `verify()` a tree rooted at the last chosen token and `commit()` the accepted
nodes, and `free()` it at the end.

`Runner` lists every member the engine requires; the members in OPTIONAL may be missing, and the engine
reads them only through `runner_member()`, which gives their documented default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..medusa.trees import MedusaTree


@dataclass
class TreeInput:
    """One slot's share of a verification step: the tree shape and its T input tokens (root first)."""

    slot: int
    tree: MedusaTree
    tokens: list[int]


# What prefill and verify return per slot: (logits fp32 on the CPU or the runner's device, hidden
# states in the runner's dtype). Prefill: [V] and [H] of the chunk's last token, or an EMPTY hidden
# when the runner does not compute it there (llama.cpp: the engine then waits for the first verify
# step's before the request's heads run); verify: [T, V] and [T, H], one row per tree node.
SlotOutput = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Runner(Protocol):
    max_slots: int  # slots that can hold a request at once
    max_context: int  # tokens a slot may hold (prompt + output + the tree being verified)
    max_leaves: int | None  # tree leaves one step may verify in all (None: no limit)
    device: torch.device  # where hidden states live (the Medusa heads run there)
    dtype: torch.dtype
    hidden_size: int
    # True when verify() decodes a step's accepted speculative tokens again in the next step (llama.cpp's
    # exact mode keeps cells in position order that way): the policy prices trees with that cost.
    recomputes_accepted: bool

    @property
    def lm_head(self) -> nn.Module:
        """The base model's output projection (shared-lm_head Medusa heads read it)."""

    @property
    def eos_token_ids(self) -> set[int]:
        """End-of-sequence ids the model itself declares (beyond the tokenizer's)."""

    def alloc(self) -> int: ...

    def free(self, slot: int) -> None: ...

    def length(self, slot: int) -> int:
        """Tokens committed to `slot` so far."""

    def prefill(self, chunks: dict[int, list[int]]) -> dict[int, SlotOutput]:
        """Append prompt chunks to their slots in one pass."""

    def verify(self, batch: list[TreeInput]) -> dict[int, SlotOutput]:
        """Every slot's tree in one forward pass (nothing is committed yet)."""

    def commit(self, accepted: dict[int, list[int]]) -> None:
        """Keep each slot's accepted tree nodes (root first) and drop the rest of its tree."""

    def synchronize(self) -> None:
        """Wait until the work handed to the device so far is done. On a GPU a forward pass returns as soon as
        its kernels are queued: every timing reads the clock only after this, or it charges a shape the time
        of the work queued before it."""


def synchronize_device(device: torch.device) -> None:
    """Wait for torch's work queued on `device` (nothing to wait for on a CPU: its ops return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Members a runner may lack, and what the engine assumes then (read through runner_member()):
OPTIONAL: dict[str, Any] = {
    # KV cells all slots share (llama.cpp's one context): the engine admits a request only when its prompt,
    # max_tokens and tree room fit beside the others'. None: every slot owns `max_context` cells.
    "kv_cells": None,
    "kv_parked": 0,  # shared cells held by finished requests and not reusable yet (llama.cpp's exact mode)
    "kv_bytes": None,  # () -> int: bytes the KV cache holds now (it may grow: memory checks subtract it)
    "n_batch": None,  # tokens one forward pass may take (llama.cpp's n_batch; the trees are cut to it)
    "numerics": None,  # {"mode", "guarantee", "mode_reason", "kv_cells"} for /info (llama.cpp's modes)
    # fresh(max_slots=None) -> Runner: a new runner with its own cache over the same weights; the supervisor
    # resets a crashed engine's runner with it (None: it restarts over the old cache).
    "fresh": None,
    "close_context": None,  # () -> None: free the KV cache, keep the weights (before fresh() builds a new one)
    "close": None,  # () -> None: let go of everything (after fresh() took the weights)
    # Prefix reuse (engine/prefix.py; None: no reuse). truncate(slot, n): keep the first n tokens of a slot.
    # copy_prefix(src, dst, n): dst holds src's first n tokens (its own dropped); src keeps them.
    "truncate": None,
    "copy_prefix": None,
}


def runner_member(runner: Runner, name: str) -> Any:
    """An optional member of `runner` (see OPTIONAL), or its default when the runner has none."""
    return getattr(runner, name, OPTIONAL[name])
