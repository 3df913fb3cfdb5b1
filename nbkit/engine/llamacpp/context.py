"""One llama.cpp model and context, and reading a decode's outputs: what the runner builds on.

Knows nothing of slots or trees: the runner (runner.py) decides which tokens go into the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from .bindings import cpu_threads

log = logging.getLogger("nbkit.engine")


class LlamaContext:
    """The model, its context (a unified KV cache with sequence ids) and the output buffers.

    Subclasses set lib, model_path, n_batch, n_ubatch, n_seq_max, device, dtype, want_hidden before
    calling _load_model and _create_context, and exact, scratch, retired, _pad_single, _batch, _mem
    before decoding.
    """

    @property
    def numerics(self) -> dict:
        """{"mode", "guarantee"}: what the server's /info shows."""
        return {"mode": self.mode, "guarantee": self.guarantee}

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
        lib = self.lib
        mparams = lib.llama_model_default_params()
        if n_gpu_layers is None:
            n_gpu_layers = 999 if lib.llama_supports_gpu_offload() else 0
        mparams.n_gpu_layers = n_gpu_layers
        self.on_cpu = n_gpu_layers == 0
        self._model = lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {self.model_path} (not a GGUF model file?)")
        self._vocab = lib.llama_model_get_vocab(self._model)

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
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context (out of memory? try a smaller n_ctx)")

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self.lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self.lib.llama_model_free(self._model)
            self._model = None

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
