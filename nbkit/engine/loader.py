"""Build a ready engine from names: the model, its Medusa heads, the device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..medusa.heads import MedusaHeads, embedded_heads_dir, load_heads
from ..models import default_device, default_dtype, load_model
from .scheduler import Engine
from .threads import in_fresh_thread
from .torch_runner import TorchRunner


def resolve_heads(heads: str | os.PathLike | None, model: str | os.PathLike | None) -> Path | None:
    """'embedded' (or None with the embedded model) -> the shipped SmolLM2 heads; 'none' -> no heads."""
    if heads is None:
        embedded_model = model is None or str(model) in ("embedded", "default", "")
        return embedded_heads_dir() if embedded_model and embedded_heads_dir().exists() else None
    if str(heads) == "none":
        return None
    if str(heads) == "embedded":
        return embedded_heads_dir()
    return Path(heads)


def load_torch_engine(
    model: str | os.PathLike | None = None, heads: str | os.PathLike | MedusaHeads | None = None,
    device: str | None = None, dtype: torch.dtype | None = None, max_batch: int = 16,
    **engine_kwargs,
) -> Engine:
    """A torch Engine (not started) for `model` (default: the embedded SmolLM2) and its heads.

    Loading runs in a short-lived thread so that the caller's thread never starts an OpenMP pool:
    the engine thread then has the cores to itself (threads.py explains the measured cost).
    """
    return in_fresh_thread(_load, model, heads, device, dtype, max_batch, engine_kwargs)


def _load(model, heads, device, dtype, max_batch, engine_kwargs) -> Engine:
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    if not isinstance(heads, MedusaHeads):
        path = resolve_heads(heads, model)
        heads = None if path is None else load_heads(path, base.config.hidden_size, dtype=dtype, device=device)
    else:
        heads = heads.to(device=device, dtype=dtype).eval()
    runner = TorchRunner(base, max_slots=max_batch)
    name = engine_kwargs.pop("model_name", None) or (str(model) if model is not None else "SmolLM2-135M-Instruct")
    return Engine(runner, tokenizer, heads, model_name=name, **engine_kwargs)
