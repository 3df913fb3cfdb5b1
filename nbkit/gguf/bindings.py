"""llama.cpp's low-level bindings: loading them (with a clear error), quiet logging, a vectorized batch."""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque

import numpy as np

_BACKEND_READY = False


# llama.cpp's recent log lines (every level): a failed call returns only NULL, and its reason is in the log.
_LOG_LINES = 400
_log_tail: deque[str] = deque(maxlen=_LOG_LINES)
_partial: list[str] = []
_logged = [0]  # lines logged so far (a list: the callback updates it without a global statement)
_GGML_LOG_DEBUG, _GGML_LOG_ERROR, _GGML_LOG_CONT = 1, 4, 5
_level = [0]  # the level of the line being written (GGML_LOG_LEVEL_CONT continues it)


def _keep_log(level: int, text: bytes, user_data) -> None:
    """Keep every line above debug level (log_since reads them) and print errors, or everything with
    NBKIT_LLAMA_VERBOSE=1."""
    chunk = text.decode("utf-8", "replace")
    if level != _GGML_LOG_CONT:
        _level[0] = level
    if _level[0] == _GGML_LOG_ERROR or os.environ.get("NBKIT_LLAMA_VERBOSE") == "1":
        print(chunk, end="", file=sys.stderr, flush=True)
    if _level[0] == _GGML_LOG_DEBUG:  # thousands of lines per context: nothing a failure is explained by
        return
    _partial.append(chunk)
    if chunk.endswith("\n"):
        _log_tail.append("".join(_partial).rstrip("\n"))
        _logged[0] += 1
        _partial.clear()


_log_callback = None  # the ctypes callback; a module global so it is never garbage-collected (else a segfault)


def log_count() -> int:
    """Lines llama.cpp has logged so far: a mark for log_since."""
    return _logged[0]


def log_since(mark: int) -> list[str]:
    """The lines logged after `mark` (log_count() before a call) that are still kept."""
    return list(_log_tail)[max(0, len(_log_tail) - (_logged[0] - mark)):]


def failure_reason(lines: list[str]) -> str:
    """What llama.cpp said about a failure: its error lines among `lines` (else the last three lines)."""
    keys = ("error", "fail", "does not", "unsupported", "invalid", "cannot", "could not", "out of memory")
    said = [ln.strip() for ln in lines if ln.strip() and any(k in ln.lower() for k in keys)]
    said = said or [ln.strip() for ln in lines if ln.strip()][-3:]
    return "; ".join(said[-4:]) or "llama.cpp logged no reason"


def llama_cpp_module():
    """The low-level bindings, with llama.cpp's log kept (log_since) and quietened; a clear error if they are
    missing."""
    global _BACKEND_READY, _log_callback
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(
            "llama-cpp-python is not installed. Build it for this machine with `python -m nbkit build` "
            "(CPU) or `python -m nbkit build --cuda` (GPU); `make setup` installs the CPU build."
        ) from err
    if not _BACKEND_READY:
        _log_callback = llama_cpp.llama_log_callback(_keep_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
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
