"""One llama.cpp model and context, and reading a decode's outputs: what the runner owns.

Knows nothing of slots or trees: the runner (runner.py) decides which tokens go into the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ...gguf.bindings import Batch, cpu_threads, failure_reason, llama_cpp_module, log_count, log_since
from ...gguf.patches import kernel_digest
from .model import acquire_model, release_model
from .sizing import choose_mode, context_cells, kv_bytes_per_cell

log = logging.getLogger("nbkit.engine")

GGML_TYPE_BF16 = 30  # ggml.h; the bindings do not export it
EXACT_UBATCH = 63  # ggml-cpu switches to tiled flash attention at 64 query rows (GGML_FA_TILE_Q)


class LlamaContext:
    """The model (the process's shared copy), its context (a unified KV cache with sequence ids), the batch
    buffer and the output buffers; the exact/fast mode they were configured for.

    Sequence ids: [0, max_slots) are the slots' homes, the next `max_leaves` are lent to tree leaves; exact
    mode keeps the last two for the padding token (`scratch`) and for the cells of finished slots (`retired`,
    counted in `kv_parked`)."""

    def __init__(self, model_path: Path, max_slots: int, device: torch.device, dtype: torch.dtype,
                 n_ctx: int | None = None, exact: bool | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, hidden: bool = True, n_batch: int | None = None,
                 flash_attn: bool | None = None, kv_type: str = "f16", v_type: str | None = None,
                 kv_budget_bytes: int | None = None):
        self.lib = llama_cpp_module()
        self.model_path, self.device, self.dtype, self.want_hidden = model_path, device, dtype, hidden
        self.ctx = None
        self._load_model(n_gpu_layers)
        try:
            self._choose_mode(exact, kv_type, v_type, flash_attn)
            self._sequence_ids(max_slots)
            self._size(max_slots, n_ctx, n_batch, kv_budget_bytes)
            quantized = "q8_0" in (self.k_type, self.v_type)
            self._create_context(n_threads, hidden, True if self.exact or quantized else flash_attn)
        except BaseException:
            self.close()  # this context's reference to the shared model
            raise
        self.n_ctx = self.lib.llama_n_ctx(self.ctx)
        # Cells every request shares (the engine admits by them); exact mode's padding token needs one.
        self.kv_cells = self.n_ctx - (1 if self.pad_single else 0)
        self.kv_parked = 0  # cells of finished requests parked on the retired id (exact mode)
        self.mem = self.lib.llama_get_memory(self.ctx)
        self.batch = Batch(self.lib, self.n_batch + 1, self.n_seq_max)
        self._embeddings_on = hidden

    @property
    def numerics(self) -> dict:
        """{"mode", "guarantee", "mode_reason", "kv_cells", "attention"}: what the server's /info shows."""
        return {"mode": self.mode, "guarantee": self.guarantee, "mode_reason": self.mode_reason,
                "kv_cells": self.kv_cells, "attention": self.attention_kernel}

    @property
    def attention_kernel(self) -> str:
        """Which CPU flash-attention kernel serves this context's cache types (nbkit/gguf/patches)."""
        if self.k_type.replace("f32", "f16") == self.v_type.replace("f32", "f16"):
            return "ggml (tiled or split; exact mode pads around them)" if self.exact else "ggml"
        digest = kernel_digest()
        return f"nbkit rows kernel {digest}" if digest else "ggml plain rows kernel (a llama.cpp built without nbkit's)"

    @property
    def mode(self) -> str:
        """'exact' (greedy output independent of the tree and of the batch) or 'fast'."""
        return "exact" if self.exact else "fast"

    @property
    def guarantee(self) -> str:
        """What the mode promises, in words (the server's /info shows it)."""
        if not self.exact:
            return ("none: greedy output may differ with a speculation tree, with the other requests "
                    "in the batch, and with prefix reuse (near-ties flip)")
        where = "" if self.on_cpu else " (verified on the CPU backend; GPU kernels not checked)"
        return ("greedy output is bit-identical with any speculation tree or none, and whatever other "
                "requests share the batch, with prefix reuse or without" + where)

    def _load_model(self, n_gpu_layers: int | None) -> None:
        """The process's one copy of the model (model.py): a fresh() runner shares the weights."""
        lib = self.lib
        if n_gpu_layers is None:
            n_gpu_layers = 999 if lib.llama_supports_gpu_offload() else 0
        self.on_cpu = n_gpu_layers == 0
        self._shared = acquire_model(lib, self.model_path, n_gpu_layers)
        self.model = self._shared.pointer
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.vocab_size = lib.llama_vocab_n_tokens(self.vocab)
        self.hidden_size = lib.llama_model_n_embd(self.model)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)
        self.eos_token_ids = {lib.llama_vocab_eos(self.vocab), lib.llama_vocab_eot(self.vocab)} - {-1}

    def _choose_mode(self, exact: bool | None, kv_type: str, v_type: str | None, flash_attn: bool | None) -> None:
        """Exact or fast, and the cache types (sizing.choose_mode), from the device and the model's head size."""
        lib, model = self.lib, self.model
        n_head = max(1, lib.llama_model_n_head(model))
        head_dim = lib.llama_model_n_embd(model) // n_head
        mode = choose_mode(exact, self.on_cpu, head_dim, kv_type, v_type, flash_attn)
        self.exact, self.k_type, self.v_type, self.mode_reason = mode.exact, mode.k_type, mode.v_type, mode.reason
        # With K and V of one type (f32 is read as f16) ggml's flash attention tiles ubatches of >= 64 tokens
        # and splits a single token's cells across threads: exact mode then needs ubatches of <= 63 tokens and
        # pads single tokens. K and V of different types rule both paths out: full ubatches, no padding.
        self.pad_single = self.exact and self.k_type.replace("f32", "f16") == self.v_type.replace("f32", "f16")
        kv_dim = lib.llama_model_n_head_kv(model) * head_dim
        self.kv_bytes_per_cell = kv_bytes_per_cell(lib.llama_model_n_layer(model), kv_dim, self.k_type, self.v_type)

    def _sequence_ids(self, max_slots: int) -> None:
        """Homes [0, max_slots), leaves after them; exact mode keeps the last two ids for the padding token
        (scratch) and the cells of finished slots (retired)."""
        self.n_seq_max = min(256, self.lib.llama_max_parallel_sequences())
        reserved = 2 if self.exact else 0
        if max_slots + reserved >= self.n_seq_max:
            raise ValueError(f"max_slots must be below {self.n_seq_max - reserved} (llama.cpp's sequence-id limit)")
        self.scratch, self.retired = (self.n_seq_max - 1, self.n_seq_max - 2) if self.exact else (None, None)
        self.max_leaves = self.n_seq_max - max_slots - reserved

    def _size(self, max_slots: int, n_ctx: int | None, n_batch: int | None, kv_budget_bytes: int | None) -> None:
        """Cells from the plan (sizing.context_cells) unless given; the batch and ubatch sizes the mode allows."""
        self.n_ctx_asked = n_ctx or context_cells(max_slots, self.n_ctx_train, self.kv_bytes_per_cell, kv_budget_bytes)
        self.n_batch = min(n_batch or max(512, 64 * max_slots), self.n_ctx_asked - 1)
        self.n_ubatch = min(self.n_batch, EXACT_UBATCH if self.pad_single else 512)

    def _create_context(self, n_threads: int | None, hidden: bool, flash_attn: bool | None) -> None:
        """One context for every slot: a unified KV cache whose cells carry sequence ids (runner.py's docstring)."""
        lib, n_ctx, k_type, v_type = self.lib, self.n_ctx_asked, self.k_type, self.v_type
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch + 1  # + 1: the padding token
        cparams.n_ubatch = self.n_ubatch
        cparams.n_seq_max = self.n_seq_max
        threads = n_threads or int(os.environ.get("NBKIT_LLAMA_THREADS", "0")) or cpu_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = hidden
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        cparams.kv_unified = True
        cparams.flash_attn_type = {True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED, False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                                   None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
        types = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
                 "q8_0": lib.GGML_TYPE_Q8_0}
        cparams.type_k, cparams.type_v = types[k_type], types[v_type]
        mark = log_count()
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells (K {k_type}, V {v_type}): "
                               f"{failure_reason(log_since(mark))}")
        self.kv_log = [ln for ln in log_since(mark) if "llama_kv_cache" in ln]  # what llama.cpp allocated

    def close_context(self) -> None:
        """Free the context (its KV cache) and keep the model: a fresh() runner then builds a new one over it."""
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        """Free the context and this context's reference to the shared model."""
        self.close_context()
        if getattr(self, "_shared", None) is not None:
            release_model(self.lib, self._shared)
            self._shared = self.model = None

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: the bindings may be gone already
            self.close()

    def set_embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self.lib.llama_set_embeddings(self.ctx, on)
            self._embeddings_on = on

    def park(self, seq: int, cells: int) -> None:
        """Exact mode: move a finished slot's cells to the retired id (`cells` of them) instead of freeing them:
        a hole below running slots' cells would break their cell order."""
        self.lib.llama_memory_seq_cp(self.mem, seq, self.retired, -1, -1)
        self.kv_parked += cells

    def drop_cells(self, seq: int, keep: int) -> None:
        """Remove `seq`'s cells from position `keep` on; exact mode parks them (no hole below running cells)."""
        last = self.lib.llama_memory_seq_pos_max(self.mem, seq)
        if last < keep:
            return
        if self.exact:
            self.lib.llama_memory_seq_cp(self.mem, seq, self.retired, keep, -1)
            self.kv_parked += last + 1 - keep
        self.lib.llama_memory_seq_rm(self.mem, seq, keep, -1)

    def release_parked(self) -> None:
        """Free the retired cells: when no slot runs (nothing left whose order matters) or the context is full."""
        self.lib.llama_memory_seq_rm(self.mem, self.retired, -1, -1)
        self.kv_parked = 0

    def outputs(self, rows: np.ndarray, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [R, V] fp32 (CPU) and hidden [R, H] (runner device/dtype) of output rows `rows` of the last decode."""
        ptr = self.lib.llama_get_logits(self.ctx)
        logits = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab_size))[rows])
        if not (self.want_hidden and self._embeddings_on):
            return logits, torch.empty(len(rows), 0, device=self.device, dtype=self.dtype)
        eptr = self.lib.llama_get_embeddings(self.ctx)
        hidden = torch.from_numpy(np.ctypeslib.as_array(eptr, shape=(n_out, self.hidden_size))[rows])
        return logits, hidden.to(device=self.device, dtype=self.dtype)

    def decode(self) -> None:
        """llama_decode of the batch buffer as the runner filled it (padded in exact mode, see _choose_mode)."""
        b = self.batch
        n = b.struct.n_tokens
        padded = self.pad_single and n % self.n_ubatch == 1
        if padded:  # no single-token ubatch: ggml would take its split-KV attention path
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n, 0], b.output[n] = 0, 0, 1, self.scratch, 0
            b.struct.n_tokens = n + 1
        try:
            rc = self.lib.llama_decode(self.ctx, b.struct)
            if rc == 1 and self.exact and self.lib.llama_memory_seq_pos_max(self.mem, self.retired) >= 0:
                # Full: give the retired cells back (cell order may break from here on) and try again.
                log.warning("llama.cpp context full: releasing finished requests' cells (exactness may suffer)")
                self.release_parked()
                rc = self.lib.llama_decode(self.ctx, b.struct)
        finally:
            if padded:
                self.lib.llama_memory_seq_rm(self.mem, self.scratch, -1, -1)
                b.struct.n_tokens = n
        if rc == 1:
            raise RuntimeError(f"the llama.cpp context is full ({self.n_ctx} cells shared by all requests)")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    # ---- introspection (the runner's seq_ranges, for tests) ------------------------------
    def seq_ranges(self) -> dict[int, tuple[int, int]]:
        """{sequence id: (pos_min, pos_max)} for every sequence id that holds cells."""
        out = {}
        for seq in range(self.n_seq_max):
            lo = self.lib.llama_memory_seq_pos_min(self.mem, seq)
            if lo >= 0:
                out[seq] = (lo, self.lib.llama_memory_seq_pos_max(self.mem, seq))
        return out
