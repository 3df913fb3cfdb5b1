"""The llama.cpp runner: the same slots, prefill, verify and commit as the torch runner, on a GGUF file.

One llama.cpp context serves every slot. Its KV cache is unified (`kv_unified`): cells belong to sequence ids, and
a token sees exactly the cells that carry its sequence id. Each slot owns one "home" sequence id (= the slot
number) holding its accepted tokens. A verification step puts every running slot's tree into ONE `llama_decode`:

- the root (the token already chosen, always accepted) goes into the home sequence;
- the other nodes of a chain go into the home sequence too, at positions n_past + depth;
- a tree with several leaves borrows one sequence id per leaf: the home prefix is first copied to each leaf id
  (`seq_cp`, metadata only), and every node carries the ids of all leaves under it (the root all of them). Each
  leaf id then sees the prefix plus exactly its own root-to-leaf path, which is the Medusa tree mask.

Committing keeps the accepted path in the home sequence and removes every borrowed id, which frees the rejected
branches' cells. `seq_keep` is never used (it would drop every other slot). The context has 256 sequence ids; those
that are not homes form the leaf budget (`max_leaves`) the policy respects.

The context runs with embeddings on, so every output row also gives the final-norm hidden state the Medusa heads
read. Prompts are prefilled with embeddings off (with them on, llama.cpp makes every prompt token an output row)
and prefill returns no hidden state: the request's first verification step gives the first one. Its heads start one
step later; a prompt costs one decode instead of two.

Exactness (docs/measurements.md explains what was measured): with flash attention a token's logits are
bit-identical whatever else is in the batch as long as a row kernel runs (each query row alone over its cells
in cell order) and the sequence's cells lie in position order. Without flash attention the sums depend on the
absolute cell index, and a last-bit difference can change greedy text. With K and V caches of one type ggml
leaves its row kernel for ubatches of >= 64 tokens (tiles) and for a single token over >= 512 cells (split
across threads). `exact=True`, the default on a CPU, therefore runs flash attention on with an f16 K cache and
a q8_0 V cache (types that differ: a row kernel always, nbkit's own in the llama.cpp nbkit builds,
nbkit/gguf/patches, as fast as ggml's tiled one), and keeps cells in order: permanent tokens (roots, and last
step's accepted nodes, decoded again) go before all speculative nodes, speculative cells are dropped after each
step, and a finished slot's cells are parked on a "retired" id until the context is idle. The price: accepted
speculative tokens are computed twice. With `v_type="f16"` (and on a GPU, whose kernels this analysis does not
cover) exact mode instead caps ubatches at 63 tokens and pads a single-token ubatch with a dummy token on a
scratch id (dearer on a CPU: docs/bench/llamacpp_exact.md). `exact=False` (flash attention auto, f16 cache,
512-token ubatches, no cell order) is the fast mode, with no such guarantee; it is the default with GPU offload
(sizing.choose_mode says why), where the start-up self-check compares tree and plain logits on the device.
Prefix reuse (engine/prefix.py) truncates a finished slot or shares another's cells (seq_cp); exact mode parks
the cells it drops too (a reused prefix keeps its cells in position order).

Cells come from the plan (sizing.context_cells): every slot at the model's full context, or the plan's KV budget.
`kv_cells` says how many all slots share: the engine admits requests only while their reserved tokens fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...medusa.trees import MedusaTree
from ..runner import TreeInput, synchronize_device
from .context import EXACT_UBATCH, LlamaContext  # noqa: F401  (EXACT_UBATCH: tests import it from here)
from .lm_head import Int8LmHead, gguf_lm_head


class LlamaCppRunner:
    """Forward passes for a batch of slots on a GGUF model through llama.cpp's low-level API (runner.Runner).

    It owns one LlamaContext (`context`: the model, its KV cache, the batch and output buffers) and keeps the
    slots' bookkeeping: lengths, exact mode's carry, the leaf ids lent to a step's trees, the trees pending.

    model_path: the GGUF file. exact: the bit-exact configuration (see the module docstring); False the fast one;
    None (default) exact on a CPU, fast with GPU offload. kv_budget_bytes: the plan's KV budget (None: the CPU
    default size). flash_attn: None = on when exact, llama.cpp's auto otherwise; off is the most accurate
    single-request path (flash attention reads K/V as f16) but not placement-invariant. kv_type: "f16" or "f32"
    (under flash attention llama.cpp casts K/V to f16 anyway). device/dtype: where the hidden states go (the Medusa
    heads and `lm_head` run there). hidden=False skips the hidden states (no heads): prompts then need one decode
    instead of two.
    """

    def __init__(self, model_path: str | os.PathLike, max_slots: int = 16, n_ctx: int | None = None,
                 exact: bool | None = None, n_threads: int | None = None, n_gpu_layers: int | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 hidden: bool = True, n_batch: int | None = None, flash_attn: bool | None = None,
                 kv_type: str = "f16", v_type: str | None = None, kv_budget_bytes: int | None = None):
        self._settings = dict(n_ctx=n_ctx, exact=exact, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                              device=device, dtype=dtype, hidden=hidden, n_batch=n_batch, flash_attn=flash_attn,
                              kv_type=kv_type, v_type=v_type, kv_budget_bytes=kv_budget_bytes)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.model_path}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.context = LlamaContext(self.model_path, max_slots, self.device, self.dtype, n_ctx=n_ctx, exact=exact,
                                    n_threads=n_threads, n_gpu_layers=n_gpu_layers, hidden=hidden, n_batch=n_batch,
                                    flash_attn=flash_attn, kv_type=kv_type, v_type=v_type,
                                    kv_budget_bytes=kv_budget_bytes)
        c = self.context
        self.lib = c.lib  # the bindings module (slot bookkeeping calls llama_memory_seq_*)
        # Facts of the context, fixed once it exists, that the Runner contract, the engine and the tests read.
        self.exact, self.k_type, self.v_type, self.on_cpu = c.exact, c.k_type, c.v_type, c.on_cpu
        self.mode, self.guarantee = c.mode, c.guarantee  # fixed once the context exists (/info shows them)
        self.recomputes_accepted = c.exact  # the carry: accepted nodes are decoded again next step
        self.vocab_size, self.hidden_size, self.eos_token_ids = c.vocab_size, c.hidden_size, c.eos_token_ids
        self.n_ctx, self.n_batch, self.kv_cells, self.max_leaves = c.n_ctx, c.n_batch, c.kv_cells, c.max_leaves
        self.max_context = min(c.n_ctx_train, c.kv_cells)
        self.max_slots = max_slots
        self.lengths = [0] * max_slots  # tokens committed per slot (in the KV cache or in its carry)
        self._carry: list[list[int]] = [[] for _ in range(max_slots)]  # exact mode: accepted, to decode again
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._free_leaves = list(range(max_slots + c.max_leaves - 1, max_slots - 1, -1))
        self._pending: dict[int, _Pending] = {}  # slot -> the tree verified but not yet committed
        self._lm_head: nn.Module | None = None

    # ---- the context's state, as the server's /info and the tests read it ------------------
    @property
    def numerics(self) -> dict:
        return self.context.numerics

    @property
    def kv_parked(self) -> int:
        """Cells of finished requests parked on the retired id (exact mode): the engine counts them as held."""
        return self.context.kv_parked

    def kv_bytes(self) -> int:
        """The one context's KV cells, allocated whole at start-up."""
        return int(self.context.n_ctx * self.context.kv_bytes_per_cell)

    def seq_ranges(self) -> dict[int, tuple[int, int]]:
        return self.context.seq_ranges()

    def close_context(self) -> None:
        self.context.close_context()

    def close(self) -> None:
        self.context.close()

    def fresh(self, max_slots: int | None = None) -> LlamaCppRunner:
        """A new runner (own context and KV cache) over the same GGUF file and settings, sharing this one's
        loaded model (model.py: never a second copy of the weights)."""
        runner = LlamaCppRunner(self.model_path, max_slots or self.max_slots, **self._settings)
        runner._lm_head = self._lm_head  # share the dequantized output weights
        return runner

    def synchronize(self) -> None:
        """llama.cpp's queued decode (GPU backends return early), then torch's work where the heads run."""
        self.lib.llama_synchronize(self.context.ctx)
        synchronize_device(self.device)

    # ---- the base lm_head for shared-format Medusa heads (dequantized on first use) -----------
    @property
    def lm_head(self) -> nn.Module:
        if self._lm_head is None:
            dense = gguf_lm_head(self.model_path, self.device, self.dtype)
            self._lm_head = dense if self.device.type == "cuda" else Int8LmHead(dense)
        return self._lm_head

    @lm_head.setter
    def lm_head(self, module: nn.Module) -> None:
        self._lm_head = module

    # ---- slots --------------------------------------------------------------------------
    def alloc(self) -> int:
        if not self._free_slots:
            raise RuntimeError("no free slot")
        slot = self._free_slots.pop()
        self.lengths[slot] = 0
        self._carry[slot] = []
        return slot

    def free(self, slot: int) -> None:
        self._drop_speculative(slot)
        if self.exact:  # park the cells: a hole below running slots' cells would break their cell order
            self.context.park(slot, self.kv_length(slot))
        self.lib.llama_memory_seq_rm(self.context.mem, slot, -1, -1)
        self.lengths[slot] = 0
        self._carry[slot] = []
        self._free_slots.append(slot)
        if self.exact and len(self._free_slots) == self.max_slots:
            self.context.release_parked()  # idle: nothing left whose order matters

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def truncate(self, slot: int, n: int) -> None:
        """Keep the first `n` tokens of `slot` (prefix reuse: engine/prefix.py)."""
        self._drop_speculative(slot)
        self.copy_prefix(slot, slot, n)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """`dst` holds the first `n` tokens of `src`, its own dropped (src == dst: a truncation); cells are shared
        (seq_cp), not copied."""
        kv = self.kv_length(src)
        self._carry[dst] = self._carry[src][: max(0, n - kv)]
        self.context.drop_cells(dst, min(n, kv) if src == dst else 0)
        if src != dst:
            self.lib.llama_memory_seq_cp(self.context.mem, src, dst, 0, min(n, kv))
        self.lengths[dst] = n

    def kv_length(self, slot: int) -> int:
        """Tokens of `slot` in llama.cpp's KV cache (exact mode decodes its carry again next step)."""
        return self.lengths[slot] - len(self._carry[slot])

    @property
    def free_leaves(self) -> int:
        """Sequence ids free for tree leaves (all of them between steps)."""
        return len(self._free_leaves)

    def _drop_speculative(self, slot: int) -> None:
        """Forget a tree verified but never committed: its cells from the root on, and its leaf ids."""
        pending = self._pending.pop(slot, None)
        if pending is None:
            return
        self.lib.llama_memory_seq_rm(self.context.mem, slot, pending.root_pos, -1)
        for leaf in pending.leaves:
            self.lib.llama_memory_seq_rm(self.context.mem, leaf, -1, -1)
            self._free_leaves.append(leaf)

    # ---- forward passes -----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: dict[int, list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Append prompt chunks to their slots in one decode; {slot: (logits [V], hidden)} of each chunk's last
        token. hidden is EMPTY ("not computed here"): with embeddings on, llama.cpp would make every prompt token
        an output row, and decoding the last token again costs more than one step's earlier heads gain."""
        runs = []  # (slot, first position, tokens)
        for slot, chunk in chunks.items():
            if not chunk:
                raise ValueError("empty prefill chunk")
            if self.lengths[slot] + len(chunk) > self.max_context:
                raise ValueError(f"context of {self.lengths[slot] + len(chunk)} tokens exceeds the model's "
                                 f"{self.max_context}")
            self._drop_speculative(slot)
            carry = self._carry[slot]
            runs.append((slot, self.lengths[slot] - len(carry), carry + list(chunk)))
        try:
            self.context.set_embeddings(False)
            logits, _ = self._decode_runs(runs, last_out=True)
        except Exception:
            for slot, start, _ in runs:
                self.lib.llama_memory_seq_rm(self.context.mem, slot, start, -1)
            raise
        for slot, start, toks in runs:
            self._carry[slot] = []
            self.lengths[slot] = start + len(toks)
        none = torch.empty(0, device=self.device, dtype=self.dtype)
        return {slot: (logits[i], none) for i, (slot, _, _) in enumerate(runs)}

    def _decode_runs(self, runs: list[tuple[int, int, list[int]]], last_out: bool = False):
        """Decode runs of tokens (slot, first position, tokens) in as few decodes as n_batch allows, with
        embeddings off. With last_out, returns (logits [R, V], an empty hidden) of each run's last token."""
        b, row, outs = self.context.batch, 0, []

        def flush():
            b.struct.n_tokens = row
            self.context.decode()
            if last_out:
                n_out = int(b.output[:row].sum())  # embeddings are off: only the flagged tokens are output rows
                outs.append(self.context.outputs(np.arange(n_out), n_out))

        for slot, start, toks in runs:
            i = 0
            while i < len(toks):
                if row == self.n_batch:
                    flush()
                    row = 0
                k = min(len(toks) - i, self.n_batch - row)
                b.token[row: row + k] = toks[i: i + k]
                b.pos[row: row + k] = np.arange(start + i, start + i + k)
                b.seq_id[row: row + k, 0] = slot
                b.n_seq_id[row: row + k] = 1
                b.output[row: row + k] = 0
                i += k
                row += k
                if last_out and i == len(toks):
                    b.output[row - 1] = 1
        if row:
            flush()
        if last_out:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return None

    @torch.inference_mode()
    def verify(self, batch: list[TreeInput]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every slot's tree in ONE llama_decode. Returns {slot: (logits [T, V] fp32, hidden [T, H])}."""
        for item in batch:
            self._drop_speculative(item.slot)
        self._check_room(batch)
        self.context.set_embeddings(self.context.want_hidden)
        # Permanent tokens (carry + root) of every slot first, then all speculative nodes: with that
        # order a slot's cells stay in position order even after the speculative cells are dropped.
        node_rows, row = self._place_roots(batch)
        row = self._place_nodes(batch, node_rows, row)
        b = self.context.batch
        b.output[:row] = 1
        b.struct.n_tokens = row
        try:
            self.context.decode()
        except Exception:
            for item in batch:
                self._drop_speculative(item.slot)
            raise
        for item in batch:
            self._carry[item.slot] = []
        rows = np.concatenate([node_rows[item.slot] for item in batch])
        logits, hidden = self.context.outputs(rows, row)
        out, start = {}, 0
        for item in batch:
            t = item.tree.size
            out[item.slot] = (logits[start: start + t], hidden[start: start + t])
            start += t
        return out

    def _check_room(self, batch: list[TreeInput]) -> None:
        total = sum(item.tree.size + len(self._carry[item.slot]) for item in batch)
        if total > self.n_batch:
            raise ValueError(f"{total} tree tokens exceed the batch capacity of {self.n_batch}")
        need = sum(item.tree.n_leaves for item in batch if item.tree.n_leaves > 1)
        if need > len(self._free_leaves):
            raise ValueError(f"the trees need {need} sequence ids, {len(self._free_leaves)} are free "
                             f"(llama.cpp has {self.context.n_seq_max}); use smaller trees or fewer requests")
        for item in batch:
            if self.lengths[item.slot] + item.tree.max_depth + 1 > self.max_context:
                raise ValueError(f"slot {item.slot} would exceed the context of {self.max_context} tokens")

    def _place_roots(self, batch: list[TreeInput]) -> tuple[dict[int, np.ndarray], int]:
        """Each slot's carry and root into its home sequence (and every leaf id it borrows for the step).

        Returns {slot: batch row of each tree node (the root's filled in)} and the next free row."""
        lib, mem, b = self.lib, self.context.mem, self.context.batch
        node_rows: dict[int, np.ndarray] = {}
        row = 0
        for item in batch:
            slot, tree = item.slot, item.tree
            carry = self._carry[slot]
            leaves = [self._free_leaves.pop() for _ in range(tree.n_leaves)] if tree.n_leaves > 1 else []
            for leaf in leaves:
                lib.llama_memory_seq_cp(mem, slot, leaf, -1, -1)
            root_pos = self.lengths[slot]
            k = len(carry) + 1
            b.token[row: row + k] = carry + [item.tokens[0]]
            b.pos[row: row + k] = np.arange(root_pos - len(carry), root_pos + 1)
            b.seq_id[row: row + k, 0] = slot
            b.seq_id[row: row + k, 1: 1 + len(leaves)] = leaves
            b.n_seq_id[row: row + k] = 1 + len(leaves)
            node_rows[slot] = np.empty(tree.size, dtype=np.int64)
            node_rows[slot][0] = row + k - 1
            self._pending[slot] = _Pending(root_pos, tree, leaves, item.tokens)
            row += k
        return node_rows, row

    def _place_nodes(self, batch: list[TreeInput], node_rows: dict[int, np.ndarray], row: int) -> int:
        """The speculative nodes after every root: a chain in the home sequence, a tree node in the ids of
        every leaf under it. Returns the next free row."""
        b = self.context.batch
        for item in batch:
            slot, tree, t = item.slot, item.tree, item.tree.size
            if t == 1:
                continue
            pending = self._pending[slot]
            b.token[row: row + t - 1] = item.tokens[1:]
            b.pos[row: row + t - 1] = pending.root_pos + tree.depths[1:].numpy()
            if not pending.leaves:  # a chain: straight into the home sequence
                b.seq_id[row: row + t - 1, 0] = slot
                b.n_seq_id[row: row + t - 1] = 1
            else:
                b.n_seq_id[row: row + t - 1] = 0
                for leaf, path in zip(pending.leaves, tree.retrieve.tolist()):
                    for node in path[1:]:
                        if node < 0:
                            break
                        r = row + node - 1
                        b.seq_id[r, b.n_seq_id[r]] = leaf
                        b.n_seq_id[r] += 1
            node_rows[slot][1:] = np.arange(row, row + t - 1)
            row += t - 1
        return row

    def commit(self, accepted: dict[int, list[int]]) -> None:
        """Keep each slot's accepted nodes (root first); drop every other cell of its tree."""
        lib, mem = self.lib, self.context.mem
        for slot, nodes in accepted.items():
            p = self._pending.pop(slot)
            new_len = p.root_pos + len(nodes)
            if self.exact:
                # Drop every speculative cell; the accepted nodes are decoded again, in order, next step.
                self._carry[slot] = [p.tokens[n] for n in nodes[1:]]
                lib.llama_memory_seq_rm(mem, slot, p.root_pos + 1, -1)
            elif not p.leaves:
                if nodes != list(range(len(nodes))):
                    raise ValueError(f"accepted nodes {nodes} are not a prefix of the chain")
                lib.llama_memory_seq_rm(mem, slot, new_len, -1)
            elif len(nodes) > 1:
                winner = next(leaf for leaf, path in zip(p.leaves, p.tree.retrieve.tolist()) if nodes[-1] in path)
                lib.llama_memory_seq_rm(mem, winner, new_len, -1)
                lib.llama_memory_seq_cp(mem, winner, slot, p.root_pos + 1, new_len)
            for leaf in p.leaves:
                lib.llama_memory_seq_rm(mem, leaf, -1, -1)
            self._free_leaves.extend(p.leaves)
            self.lengths[slot] = new_len

@dataclass
class _Pending:
    root_pos: int  # position of the tree's root (= the slot's length before the step)
    tree: MedusaTree
    leaves: list[int]  # borrowed sequence ids, one per leaf (empty for a chain)
    tokens: list[int]
