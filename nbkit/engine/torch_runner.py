"""The PyTorch runner: runs the forward passes the engine hands it, over a slot KV cache.

KV layout: one preallocated buffer per layer, [rows, kv_heads, capacity, head_dim]; each slot owns
one row and a length. A verification step writes every running slot's tree tokens at columns
[len, len + Q) of its own row, with positions len + depth and a float 4D mask (prefix + tree
ancestors), so ALL running requests' trees are verified in ONE forward pass. Committing keeps
only the accepted path: its nodes are moved down to [len, len + accepted) and the length grows.

The running slots are kept in physical rows [0, B) so the batch is a view of the buffer, not a copy.
The runner knows nothing of requests, sampling or HTTP: tokens in, logits and hidden states out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.cache_utils import CacheLayerMixin as CacheLayer  # transformers' abstract layer: its Cache calls it

from .runner import TreeInput, synchronize_device

GIB = 1024**3
MIN_SLOT_POSITIONS = 128  # a slot that holds fewer is no use for a chat: a budget that small is a mistake


class SlotLayer(CacheLayer):
    """One layer's KV for all slots. The runner sets `write_rows/write_cols/kv_len` before a forward."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.ctx: _ForwardContext | None = None

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        ctx = self.ctx
        if ctx.same_cols is not None and isinstance(ctx.row_slice, slice):
            # Every row writes the same columns (one request, or equal lengths): a plain slice copy.
            c0, c1 = ctx.same_cols
            self.keys[ctx.row_slice, :, c0:c1] = key_states
            self.values[ctx.row_slice, :, c0:c1] = value_states
        else:
            rows = ctx.rows_index[:, None]
            # [B, kvh, Q, d] -> [B, Q, kvh, d] to match advanced indexing on (row, column).
            self.keys[rows, :, ctx.cols] = key_states.transpose(1, 2).to(self.keys.dtype)
            self.values[rows, :, ctx.cols] = value_states.transpose(1, 2).to(self.values.dtype)
        return self.keys[ctx.row_slice, :, : ctx.kv_len], self.values[ctx.row_slice, :, : ctx.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.ctx.kv_len, 0

    def get_seq_length(self) -> int:
        return 0 if self.ctx is None else self.ctx.kv_len

    def get_max_length(self) -> int:
        return self.keys.shape[2]


@dataclass
class _ForwardContext:
    row_slice: slice | torch.Tensor  # a slice (a view of the buffer) or row indices (a gathered copy)
    rows_index: torch.Tensor  # [B]
    cols: torch.Tensor  # [B, Q] columns the new tokens are written to
    kv_len: int
    same_cols: tuple[int, int] | None = None  # (first, end) when every row writes the same columns


def _same_cols(starts: list[int], width: int) -> tuple[int, int] | None:
    return (starts[0], starts[0] + width) if all(s == starts[0] for s in starts) else None


def _row_slice(rows: list[int]) -> slice | None:
    """Consecutive rows become a slice (the batch is then a view, not a copy); None when they are not."""
    return slice(rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else None


class SlotCache(Cache):
    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)

    def set_context(self, ctx: _ForwardContext) -> None:
        for layer in self.layers:
            layer.ctx = ctx


class TorchRunner:
    """Forward passes for a batch of slots on a transformers causal LM (Llama family); see runner.Runner.

    kv_budget_bytes: the plan's KV budget. Set, the cache is allocated once (at the first forward pass) at
    max_slots rows of the positions the budget holds, and max_context shrinks to that (the engine then
    refuses what does not fit, before it runs); each row has one more scratch column, where the padding
    of a ragged prefill writes. None: rows grow on demand up to max_context (the CPU default).
    """

    max_leaves = None  # a tree mask has no limit on leaves

    def __init__(self, model, max_slots: int = 16, initial_capacity: int = 256, max_context: int | None = None,
                 kv_budget_bytes: int | None = None):
        self.model = model
        self.base = model.model
        self.lm_head = model.get_output_embeddings()
        cfg = model.config
        self.device, self.dtype = model.device, model.dtype
        self.max_slots = max_slots
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.recomputes_accepted = False
        self.vocab_size = cfg.vocab_size
        self.kv_budget_bytes = kv_budget_bytes
        self.model_context = max_context or getattr(cfg, "max_position_embeddings", 4096)
        self.max_context = self._context_within_budget(self.model_context)
        self.capacity = 0
        # The buffers are allocated at the first forward pass, in the thread that runs the engine
        # (see nbkit.engine.threads): a large fill here would start an OpenMP pool in the caller's thread.
        self.initial_capacity = initial_capacity
        self.cache = SlotCache([SlotLayer(*self._alloc(0)) for _ in range(self.n_layers)])
        self.lengths = [0] * max_slots  # per slot
        self.row_of: dict[int, int] = {}  # slot -> physical row
        self.slot_at: list[int | None] = [None] * max_slots  # physical row -> slot
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._tree_tensors: dict[tuple[int, int], tuple[object, torch.Tensor, torch.Tensor]] = {}

    @property
    def eos_token_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)

    def fresh(self, max_slots: int | None = None) -> TorchRunner:
        """A new runner (own KV cache) over the same model weights."""
        return TorchRunner(self.model, max_slots=max_slots or self.max_slots, initial_capacity=self.initial_capacity,
                           max_context=self.model_context, kv_budget_bytes=self.kv_budget_bytes)

    def synchronize(self) -> None:
        synchronize_device(self.device)

    # ---- memory -------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one position in every layer."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _context_within_budget(self, max_context: int) -> int:
        if self.kv_budget_bytes is None:
            return max_context
        per_slot = self.kv_budget_bytes // (self.max_slots * self.kv_bytes_per_token())
        if per_slot < MIN_SLOT_POSITIONS:
            raise ValueError(
                f"a KV budget of {self.kv_budget_bytes / GIB:.2f} GiB holds {per_slot} positions per slot "
                f"({self.max_slots} slots x {self.kv_bytes_per_token() / 2**20:.2f} MiB a position); at least "
                f"{MIN_SLOT_POSITIONS} are needed: give a larger budget or fewer slots (max_batch)")
        return min(max_context, per_slot - 1)  # + the scratch column

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.max_slots, self.kv_heads, capacity, self.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def _grow(self, needed: int) -> None:
        """All layers grow, or none does: a failed allocation leaves the cache as it was, still serving."""
        if needed <= self.capacity:
            return
        if self.kv_budget_bytes is not None:
            new_capacity = self.max_context + 1  # once, the whole budget (+ the scratch column)
            if needed > new_capacity:
                raise ValueError(f"{needed} positions exceed the {self.max_context} per slot that the KV budget "
                                 f"of {self.kv_budget_bytes / GIB:.2f} GiB holds")
        else:
            new_capacity = max(needed, 2 * self.capacity, self.initial_capacity)
        try:
            grown = [self._alloc(new_capacity) for _ in self.cache.layers]
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"growing the KV cache from {self.capacity} to {new_capacity} positions x {self.max_slots} slots "
                f"({new_capacity * self.max_slots * self.kv_bytes_per_token() / GIB:.2f} GiB) ran out of memory; "
                f"the cache stays at {self.capacity} positions") from err
        for layer, (keys, values) in zip(self.cache.layers, grown):
            keys[:, :, : self.capacity] = layer.keys
            values[:, :, : self.capacity] = layer.values
            layer.keys, layer.values = keys, values
        self.capacity = new_capacity

    def kv_bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.cache.layers)

    # ---- slots --------------------------------------------------------------------------
    def alloc(self) -> int:
        if not self._free_slots:
            raise RuntimeError("no free slot")
        slot = self._free_slots.pop()
        # Prefilling slots take the highest free row so running slots stay packed at the bottom.
        row = max(r for r in range(self.max_slots) if self.slot_at[r] is None)
        self.row_of[slot], self.slot_at[row] = row, slot
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        row = self.row_of.pop(slot)
        self.slot_at[row] = None
        self.lengths[slot] = 0
        self._free_slots.append(slot)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def truncate(self, slot: int, n: int) -> None:
        """Keep the first `n` tokens of `slot` (prefix reuse: a finished slot taken over by a prompt sharing them)."""
        if not 0 <= n <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of {self.lengths[slot]} tokens to {n}")
        self.lengths[slot] = n

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """`dst` holds the first `n` tokens of `src` (its own are dropped): their keys and values are copied."""
        if not 0 <= n <= self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} tokens, not {n}")
        a, b = self.row_of[src], self.row_of[dst]
        for layer in self.cache.layers:
            layer.keys[b, :, :n] = layer.keys[a, :, :n]
            layer.values[b, :, :n] = layer.values[a, :, :n]
        self.lengths[dst] = n

    def _swap_rows(self, a: int, b: int) -> None:
        rows = torch.tensor([a, b], device=self.device)  # one upload for every layer's swap
        swapped = rows.flip(0)
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):
                buf[rows] = buf[swapped]
        sa, sb = self.slot_at[a], self.slot_at[b]
        self.slot_at[a], self.slot_at[b] = sb, sa
        if sa is not None:
            self.row_of[sa] = b
        if sb is not None:
            self.row_of[sb] = a

    def _pack(self, slots: list[int]) -> list[int]:
        """Put `slots` into rows [0, B) (moving as few rows as possible); returns slots in row order."""
        n = len(slots)
        wanted = set(slots)
        outside = [s for s in slots if self.row_of[s] >= n]
        for row in range(n):
            if self.slot_at[row] not in wanted:
                self._swap_rows(row, self.row_of[outside.pop()])
        return [self.slot_at[r] for r in range(n)]

    # ---- forward passes -----------------------------------------------------------------
    def _forward(self, input_ids, positions, mask, ctx: _ForwardContext) -> torch.Tensor:
        self.cache.set_context(ctx)
        out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                        use_cache=True)
        return out.last_hidden_state

    def _upload(self, rows: list[list[int]]) -> torch.Tensor:
        """Host integers to the device in ONE copy (each torch.tensor(list, device=cuda) is a synchronization)."""
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, chunks: dict[int, list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Append prompt chunks to their slots in ONE forward pass (rows padded to the longest chunk).

        Returns {slot: (logits [V] fp32, hidden [H])} of each chunk's last token.
        """
        slots = sorted(chunks, key=self.row_of.__getitem__)  # ascending rows: usually a slice, a view of the KV
        starts = [self.lengths[s] for s in slots]
        sizes = [len(chunks[s]) for s in slots]
        for start, n in zip(starts, sizes):
            if n == 0:
                raise ValueError("empty prefill chunk")
            if start + n > self.max_context:
                raise ValueError(f"context of {start + n} tokens exceeds the model's {self.max_context}")
        b, q = len(slots), max(sizes)
        # Real tokens end at start + n; a row's pads (start + n .. start + q) all go to one scratch column past
        # every row's end, so padding never grows the cache (max(starts) + q once doubled it under load).
        kv_len = max(st + n for st, n in zip(starts, sizes))
        kv_len += any(st + q > kv_len for st in starts)
        if self.kv_budget_bytes is not None:  # pads past the end all write the scratch column, never read
            kv_len = min(kv_len, self.max_context + 1)
        self._grow(kv_len)
        rows = [self.row_of[s] for s in slots]
        # [ids padded to q | start | last index | row] per slot: one upload.
        host = self._upload([chunks[s] + [0] * (q - n) + [st, n - 1, r]
                             for s, n, st, r in zip(slots, sizes, starts, rows)])
        ids, start_t, last_t, rows_t = host[:, :q], host[:, q], host[:, q + 1], host[:, q + 2]
        cols = (start_t[:, None] + torch.arange(q, device=self.device)).clamp_(max=kv_len - 1)  # pads: past the end
        kv_cols = torch.arange(kv_len, device=self.device)
        allowed = kv_cols[None, None, :] <= cols[:, :, None]  # causal over the row's own prefix
        row_slice = _row_slice(rows)
        ctx = _ForwardContext(rows_t if row_slice is None else row_slice, rows_t, cols, kv_len, _same_cols(starts, q))
        hidden = self._forward(ids, cols, self._float_mask(allowed[:, None]), ctx)
        last = hidden[torch.arange(b, device=self.device), last_t]
        logits = self.lm_head(last).float()
        for s, n in zip(slots, sizes):
            self.lengths[s] += n
        return {s: (logits[i], last[i]) for i, s in enumerate(slots)}

    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        # transformers passes a 4D mask through untouched; it must be additive float (bool is wrong in eager).
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _tree_rows(self, tree, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(depths [Q], ancestor mask [Q, Q]) of `tree` padded to q, on the device: built and moved once per
        tree shape (the policy hands the same tree objects back; pads see themselves only)."""
        key = (id(tree), q)
        if key not in self._tree_tensors:
            if len(self._tree_tensors) > 256:
                self._tree_tensors.clear()
            t = tree.size
            depth = torch.arange(q)
            depth[:t] = tree.depths
            mask = torch.eye(q, dtype=torch.bool)
            mask[:t, :t] = tree.attn_mask
            packed = torch.cat([depth[:, None], mask.long()], dim=1).to(self.device)  # one copy
            self._tree_tensors[key] = (tree, packed[:, 0].contiguous(), packed[:, 1:].bool())
        _, depth, mask = self._tree_tensors[key]
        return depth, mask

    @torch.inference_mode()
    def verify(self, batch: list[TreeInput]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """One forward pass over every slot's tree. Returns {slot: (logits [T, V] fp32, hidden [T, H])}."""
        by_slot = {item.slot: item for item in batch}
        order = self._pack(list(by_slot))
        items = [by_slot[s] for s in order]
        b, q = len(items), max(item.tree.size for item in items)
        lengths = [self.lengths[it.slot] for it in items]
        kv_len = max(lengths) + q
        if kv_len > self.max_context + q:
            raise ValueError("context exceeds the model's maximum")
        self._grow(kv_len)
        host = self._upload([[n] + it.tokens + [0] * (q - it.tree.size) for n, it in zip(lengths, items)])
        lengths_t, ids = host[:, 0], host[:, 1:]
        trees = [self._tree_rows(it.tree, q) for it in items]
        depth = torch.stack([d for d, _ in trees])
        tree_mask = torch.stack([m for _, m in trees])
        cols = lengths_t[:, None] + torch.arange(q, device=self.device)  # [B, Q]
        positions = lengths_t[:, None] + depth
        ctx = _ForwardContext(slice(0, b), torch.arange(b, device=self.device), cols, kv_len, _same_cols(lengths, q))
        # One new token per row and equal lengths: every row sees its whole prefix, so no mask at all
        # (SDPA then takes its unmasked kernel; the common batch-1 decoding step).
        mask = None
        if not (q == 1 and ctx.same_cols is not None):
            kv_cols = torch.arange(kv_len, device=self.device)
            allowed = (kv_cols[None, None, :] < lengths_t[:, None, None]).expand(b, q, kv_len).clone()
            allowed.scatter_(2, cols[:, None, :].expand(b, q, q), tree_mask)
            mask = self._float_mask(allowed[:, None])
        hidden = self._forward(ids, positions, mask, ctx)
        sizes = [it.tree.size for it in items]
        valid = torch.cat([hidden[i, :t] for i, t in enumerate(sizes)])
        logits = self.lm_head(valid).float().split(sizes)
        return {it.slot: (logits[i], hidden[i, : sizes[i]]) for i, it in enumerate(items)}

    @torch.inference_mode()
    def commit(self, accepted: dict[int, list[int]]) -> None:
        """Keep each slot's accepted tree nodes (root first): move them to [len, len + n), grow len."""
        moves = {s: nodes for s, nodes in accepted.items() if nodes != list(range(len(nodes)))}
        if moves:
            width = max(len(n) for n in moves.values())
            host = []  # per moved slot: [row | source columns | destination columns], one upload
            for slot, nodes in moves.items():
                base = self.lengths[slot]
                pad = list(range(len(nodes), width))  # copy onto themselves: no-ops
                host.append([self.row_of[slot]] + [base + n for n in nodes + pad] + [base + i for i in range(width)])
            moved = self._upload(host)
            rows_t, src_t, dst_t = moved[:, :1], moved[:, 1 : 1 + width], moved[:, 1 + width :]
            for layer in self.cache.layers:
                for buf in (layer.keys, layer.values):
                    buf[rows_t, :, dst_t] = buf[rows_t, :, src_t]
        for slot, nodes in accepted.items():
            self.lengths[slot] += len(nodes)
