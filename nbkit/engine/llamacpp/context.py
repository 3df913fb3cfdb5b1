"""One llama.cpp model and context, and reading a decode's outputs: what the runner builds on.

Knows nothing of slots or trees: the runner (runner.py) decides which tokens go into the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from ...gguf.bindings import cpu_threads, failure_reason, log_count, log_since
from .model import acquire_model, release_model
from .sizing import choose_mode, kv_bytes_per_cell

log = logging.getLogger("nbkit.engine")


class LlamaContext:
    """The model, its context (a unified KV cache with sequence ids) and the output buffers.

    Subclasses set lib, model_path, n_batch, n_ubatch, n_seq_max, device, dtype, want_hidden before
    calling _load_model and _create_context, and exact, scratch, retired, _pad_single, _batch, _mem
    before decoding.
    """

    @property
    def numerics(self) -> dict:
        """{"mode", "guarantee", "mode_reason", "kv_cells"}: what the server's /info shows."""
        return {"mode": self.mode, "guarantee": self.guarantee, "mode_reason": self.mode_reason,
                "kv_cells": self.kv_cells}

    @property
    def mode(self) -> str:
        """'exact' (greedy output independent of the tree and of the batch) or 'fast'."""
        return "exact" if self.exact else "fast"

    @property
    def guarantee(self) -> str:
        """What the mode promises, in words (the server's /info shows it)."""
        if not self.exact:
            return ("none: greedy output may differ with a speculation tree, and with the other requests "
                    "in the batch (near-ties flip)")
        where = "" if self.on_cpu else " (verified on the CPU backend; GPU kernels not checked)"
        return ("greedy output is bit-identical with any speculation tree or none, and whatever other "
                "requests share the batch" + where)

    def _load_model(self, n_gpu_layers: int | None) -> None:
        """The process's one copy of the model (model.py): a fresh() runner shares the weights."""
        lib = self.lib
        if n_gpu_layers is None:
            n_gpu_layers = 999 if lib.llama_supports_gpu_offload() else 0
        self.on_cpu = n_gpu_layers == 0
        self._shared = acquire_model(lib, self.model_path, n_gpu_layers)
        self._model = self._shared.pointer
        self._vocab = lib.llama_model_get_vocab(self._model)

    def _choose_mode(self, exact: bool | None, kv_type: str, v_type: str | None, flash_attn: bool | None) -> None:
        """Exact or fast, and the cache types (sizing.choose_mode), from the device and the model's head size."""
        lib, model = self.lib, self._model
        n_head = max(1, lib.llama_model_n_head(model))
        head_dim = lib.llama_model_n_embd(model) // n_head
        mode = choose_mode(exact, self.on_cpu, head_dim, kv_type, v_type, flash_attn)
        self.exact, self.k_type, self.v_type, self.mode_reason = mode.exact, mode.k_type, mode.v_type, mode.reason
        self.recomputes_accepted = self.exact  # the carry: accepted nodes are decoded again next step
        # With K and V of one type (f32 is read as f16) ggml's flash attention tiles ubatches of >= 64 tokens
        # and splits a single token's cells across threads: exact mode then needs ubatches of <= 63 tokens and
        # pads single tokens. K and V of different types rule both paths out: full ubatches, no padding.
        self._pad_single = self.exact and self.k_type.replace("f32", "f16") == self.v_type.replace("f32", "f16")
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
        self.max_slots = max_slots
        self.max_leaves = self.n_seq_max - max_slots - reserved

    def _create_context(self, n_ctx: int, n_threads: int | None, hidden: bool, flash_attn: bool | None,
                        k_type: str, v_type: str) -> None:
        """One context for every slot: a unified KV cache whose cells carry sequence ids (module docstring)."""
        lib = self.lib
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
        types = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16, "q8_0": lib.GGML_TYPE_Q8_0}
        cparams.type_k, cparams.type_v = types[k_type], types[v_type]
        mark = log_count()
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()  # this runner's reference to the model
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells (K {k_type}, V {v_type}): "
                               f"{failure_reason(log_since(mark))}")
        self.kv_log = [ln for ln in log_since(mark) if "llama_kv_cache" in ln]  # what llama.cpp allocated

    def close_context(self) -> None:
        """Free the context (its KV cache) and keep the model: fresh() then builds a new one over it."""
        if getattr(self, "_ctx", None):
            self.lib.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        """Free the context and this runner's reference to the shared model."""
        self.close_context()
        if getattr(self, "_shared", None) is not None:
            release_model(self.lib, self._shared)
            self._shared = self._model = None

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: the bindings may be gone already
            self.close()

    def _set_embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self.lib.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def _outputs(self, rows: np.ndarray, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [R, V] fp32 (CPU) and hidden [R, H] (runner device/dtype) of output rows `rows` of the last decode."""
        ptr = self.lib.llama_get_logits(self._ctx)
        logits = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab_size))[rows])
        if not (self.want_hidden and self._embeddings_on):
            return logits, torch.empty(len(rows), 0, device=self.device, dtype=self.dtype)
        eptr = self.lib.llama_get_embeddings(self._ctx)
        hidden = torch.from_numpy(np.ctypeslib.as_array(eptr, shape=(n_out, self.hidden_size))[rows])
        return logits, hidden.to(device=self.device, dtype=self.dtype)

    def _decode(self) -> None:
        b = self._batch
        n = b.struct.n_tokens
        padded = self._pad_single and n % self.n_ubatch == 1
        if padded:  # no single-token ubatch: ggml would take its split-KV attention path
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n, 0], b.output[n] = 0, 0, 1, self.scratch, 0
            b.struct.n_tokens = n + 1
        try:
            rc = self.lib.llama_decode(self._ctx, b.struct)
            if rc == 1 and self.exact and self.lib.llama_memory_seq_pos_max(self._mem, self.retired) >= 0:
                # Full: give the retired cells back (cell order may break from here on) and try again.
                log.warning("llama.cpp context full: releasing finished requests' cells (exactness may suffer)")
                self.lib.llama_memory_seq_rm(self._mem, self.retired, -1, -1)
                self.kv_parked = 0
                rc = self.lib.llama_decode(self._ctx, b.struct)
        finally:
            if padded:
                self.lib.llama_memory_seq_rm(self._mem, self.scratch, -1, -1)
                b.struct.n_tokens = n
        if rc == 1:
            raise RuntimeError(f"the llama.cpp context is full ({self.n_ctx} cells shared by all requests)")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    # ---- introspection (tests) ----------------------------------------------------------
    def seq_ranges(self) -> dict[int, tuple[int, int]]:
        """{sequence id: (pos_min, pos_max)} for every sequence id that holds cells."""
        out = {}
        for seq in range(self.n_seq_max):
            lo = self.lib.llama_memory_seq_pos_min(self._mem, seq)
            if lo >= 0:
                out[seq] = (lo, self.lib.llama_memory_seq_pos_max(self._mem, seq))
        return out
