"""llama.cpp's low-level bindings: loading them (with a clear error), quiet logging, a vectorized batch."""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

_BACKEND_READY = False


def _print_errors(level: int, text: bytes, user_data) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR (the bindings' own callback maps WARN to ERROR and prints it)
        print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)


_log_errors_only = None  # the ctypes callback; a module global so it is never garbage-collected


def llama_cpp_module():
    """The low-level bindings, with llama.cpp's own logging quietened; a clear error if they are missing."""
    global _BACKEND_READY, _log_errors_only
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(
            "llama-cpp-python is not installed. Build it for this machine with `python -m nbkit build` "
            "(CPU) or `python -m nbkit build --cuda` (GPU); `make setup` installs the CPU build."
        ) from err
    if not _BACKEND_READY:
        if os.environ.get("NBKIT_LLAMA_VERBOSE") != "1":
            _log_errors_only = llama_cpp.llama_log_callback(_print_errors)
            llama_cpp.llama_log_set(_log_errors_only, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


def cpu_threads() -> int:
    """Cores this process may use. On a CPU shared with other busy processes, fewer threads (even 1) are
    much faster: ggml's threads spin at barriers, so one descheduled thread stalls every layer. Set
    NBKIT_LLAMA_THREADS to override."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class Batch:
    """A llama_batch whose arrays are numpy buffers we own, so filling it is vectorized (no per-token ctypes)."""

    def __init__(self, lib, capacity: int, max_ids: int):
        self.capacity, self.max_ids = capacity, max_ids
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.zeros(capacity, dtype=np.int32)
        self.seq_id = np.zeros((capacity, max_ids), dtype=np.int32)
        self.output = np.zeros(capacity, dtype=np.int8)
        row_bytes = self.seq_id.strides[0]
        base = self.seq_id.ctypes.data
        self._rows = (ctypes.POINTER(lib.llama_seq_id) * capacity)(
            *[ctypes.cast(base + i * row_bytes, ctypes.POINTER(lib.llama_seq_id)) for i in range(capacity)]
        )
        self.struct = lib.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self._rows, ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id)))
        self.struct.logits = self.output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
