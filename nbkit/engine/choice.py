"""Which engine serves when none is named: the one that is fastest for this machine and model, with the reason.

The rule, from the measurements in README and docs/benchmarks:
- a GPU: torch. The model and the Medusa heads run on the device in one framework; the llama.cpp engine
  needs a CUDA build of the bindings (`nbkit build --cuda`) and is chosen by name there (the notebooks do).
- a CPU and a GGUF file (the embedded model ships as one): llama.cpp. Its quantized CPU kernels decode
  several times faster than torch's float32 on the same model.
- a CPU and a transformers folder or hub id: torch, which serves the weights as they are (converting them
  to GGUF first is `nbkit convert`; then pass the .gguf).
- no llama.cpp bindings: torch, and the reason says how to build them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..models import default_device, is_embedded

AUTO = "auto"


@dataclass(frozen=True)
class EngineChoice:
    """The engine that serves ("torch" or "llamacpp") and why, in words (start-up log and /info)."""

    name: str
    reason: str


def choose_engine(requested: str | None, model: str | os.PathLike | None, device: str | None) -> EngineChoice:
    """`requested` ("torch", "llamacpp") as given; None or "auto": the fastest engine for this device and model."""
    if requested not in (None, AUTO):
        return EngineChoice(str(requested), "named by the caller (--engine)")
    device = device or default_device()
    if str(device).startswith("cuda"):
        return EngineChoice("torch", "a GPU: the torch engine runs the model and the Medusa heads on it "
                                     "(--engine llamacpp needs a CUDA build of llama.cpp)")
    if not (is_embedded(model) or Path(str(model)).suffix == ".gguf"):
        return EngineChoice("torch", "a CPU and a transformers model: torch serves its weights as they are "
                                     "(`nbkit convert` makes a GGUF that llama.cpp serves faster)")
    if importlib.util.find_spec("llama_cpp") is None:
        return EngineChoice("torch", "the llama.cpp bindings are not installed (`make serve` or `nbkit build` "
                                     "builds them; they serve a GGUF faster on a CPU)")
    return EngineChoice("llamacpp", "a CPU and a GGUF file: llama.cpp's quantized CPU kernels decode it faster "
                                    "than torch")
