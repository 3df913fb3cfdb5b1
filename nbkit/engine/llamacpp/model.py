"""One llama.cpp model per process: contexts over the same GGUF file share its weights.

Loading a second copy of a 6.7 GiB Q8_0 on a 14.7 GiB T4 fails, so a runner's `fresh()` (each benchmark
configuration, the supervisor's restart after a crash) must build a new context over the model already
loaded. Each runner holds a reference; the model is freed when the last one is released.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ...gguf.bindings import failure_reason, log_count, log_since


@dataclass
class SharedModel:
    """A loaded llama_model and how many runners use it."""

    key: tuple[str, int]  # (resolved GGUF path, n_gpu_layers)
    pointer: object  # the llama_model*
    refs: int = 0


_models: dict[tuple[str, int], SharedModel] = {}
_lock = threading.Lock()


def acquire_model(lib, path: Path, n_gpu_layers: int) -> SharedModel:
    """The loaded model for (path, n_gpu_layers), loading it only if no runner holds it; one more reference."""
    key = (str(Path(path).resolve()), n_gpu_layers)
    with _lock:
        shared = _models.get(key)
        if shared is None:
            mparams = lib.llama_model_default_params()
            mparams.n_gpu_layers = n_gpu_layers
            mark = log_count()
            pointer = lib.llama_model_load_from_file(str(path).encode(), mparams)
            if not pointer:
                raise ValueError(f"llama.cpp could not load {path}: {failure_reason(log_since(mark))}")
            shared = _models[key] = SharedModel(key, pointer)
        shared.refs += 1
        return shared


def release_model(lib, shared: SharedModel) -> None:
    """One reference fewer; the last one frees the weights."""
    with _lock:
        shared.refs -= 1
        if shared.refs > 0:
            return
        if _models.get(shared.key) is shared:
            del _models[shared.key]
        lib.llama_model_free(shared.pointer)


def loaded_models() -> int:
    """Models loaded in this process (tests)."""
    return len(_models)
