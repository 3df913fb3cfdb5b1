"""Build an Engine from names: `load_engine(kind, model, heads, ...)`, one entry point for both backends.

kind "torch" runs a transformers model (TorchRunner); kind "llamacpp" runs a GGUF file through
llama.cpp (LlamaCppRunner). The Medusa heads always run in torch, on `device`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..hub import fetch_model, resolve_heads
from ..medusa.heads import MedusaHeads, load_heads
from ..models import EMBEDDED_NAME, default_device, default_dtype
from .engine import Engine
from .threads import in_fresh_thread

ENGINES = ("torch", "llamacpp")


def load_engine(
    kind: str = "torch", model: str | os.PathLike | None = None,
    heads: str | os.PathLike | MedusaHeads | None = None, device: str | None = None, max_batch: int = 16,
    kv_budget_bytes: int | None = None, self_check: bool = True, startup_cache: bool = True, **kwargs,
) -> Engine:
    """An Engine (not started) for `model` (default: the embedded SmolLM2) and its Medusa heads.

    heads: a folder/file of Medusa heads, 'embedded', 'none', a MedusaHeads, or None (the shipped heads
    with the embedded model, else none). kind="torch" also takes dtype; kind="llamacpp" takes exact
    (True: greedy output independent of the tree and the batch; False = the fast mode, see README;
    default None: exact on a CPU, fast with GPU offload), kv_type,
    v_type, n_ctx, n_threads and n_gpu_layers. Every other keyword goes to Engine.
    self_check: at start-up the engine checks that decoding is lossless on this device (selfcheck.py) and
    falls back to a mode that is when it is not. kv_budget_bytes: the plan's KV budget for either runner
    (None: no budget; the torch cache then grows on demand, as on a CPU). startup_cache: reuse the self-check's
    verdict and the calibration of an earlier start on this machine with these files and settings, and keep
    this start's (startcache.py, under $NBKIT_CACHE_DIR/startup).

    A hub id as model or heads (`lmsys/vicuna-7b-v1.3`) is fetched first, once, into the cache (from
    $NBKIT_HUB_MIRROR when set), and the engine is named by that id, which is what clients send.
    """
    fetched = fetch_model(model)
    if fetched != model:
        kwargs.setdefault("model_name", model)
    heads = heads if isinstance(heads, MedusaHeads) else resolve_heads(heads, model)  # once: a Path or None
    model = fetched
    kwargs["self_check"] = self_check
    if kind == "torch":
        engine = _torch_engine(model, heads, device, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes, **kwargs)
    elif kind == "llamacpp":
        try:
            from .llamacpp.runner import LlamaCppRunner  # noqa: F401  (the bindings must import)
        except ImportError as err:
            raise ValueError(f"the llama.cpp engine is not available ({err}); use --engine torch") from None
        engine = _llamacpp_engine(model, heads, device, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes, **kwargs)
    else:
        raise ValueError(f"unknown engine {kind!r}: choose torch or llamacpp")
    if startup_cache:
        engine.startup_cache = _startup_cache(kind, model, heads, engine)
    return engine


def _startup_cache(kind: str, model, heads: MedusaHeads | Path | None, engine: Engine):
    """The start-up cache for this engine's files and settings (None where the files are not known: heads
    handed over as an object, a model transformers fetches itself) or turned off (NBKIT_STARTUP_CACHE=off)."""
    from ..models import resolve_model_dir
    from .startcache import StartupCache, enabled, startup_key

    runner = engine.runner
    model_file = runner.model_path if kind == "llamacpp" else resolve_model_dir(model)
    if not enabled() or isinstance(heads, MedusaHeads) or not isinstance(model_file, Path):
        return None
    return StartupCache(startup_key(kind, model_file, heads if engine.heads is not None else None, runner, engine))


def _heads(heads: MedusaHeads | Path | None, hidden_size: int, device, dtype: torch.dtype) -> MedusaHeads | None:
    """The resolved heads (hub.resolve_heads) loaded, or moved, to the device and dtype the heads run in."""
    if isinstance(heads, MedusaHeads):
        return heads.to(device=device, dtype=dtype).eval()
    return None if heads is None else load_heads(heads, hidden_size, dtype=dtype, device=device)


def _torch_engine(model, heads, device, dtype: torch.dtype | None = None, max_batch: int = 16,
                  kv_budget_bytes: int | None = None, **engine_kwargs) -> Engine:
    """Loading runs in a short-lived thread so that the caller's thread never starts an OpenMP pool:
    the engine thread then has the cores to itself (threads.py explains why)."""
    return in_fresh_thread(_load_torch, model, heads, device, dtype, max_batch, kv_budget_bytes, engine_kwargs)


def _load_torch(model, heads, device, dtype, max_batch, kv_budget_bytes, engine_kwargs) -> Engine:
    from ..models import load_model
    from .torch_runner import TorchRunner

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    heads = _heads(heads, base.config.hidden_size, device, dtype)
    runner = TorchRunner(base, max_slots=max_batch, kv_budget_bytes=kv_budget_bytes)
    name = engine_kwargs.pop("model_name", None) or (str(model) if model is not None else EMBEDDED_NAME)
    return Engine(runner, tokenizer, heads, model_name=name, **engine_kwargs)


def _llamacpp_engine(
    model, heads, device, max_batch: int = 16, speculation: str = "adaptive", exact: bool | None = None,
    n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int | None = None,
    kv_type: str = "f16", v_type: str | None = None, kv_budget_bytes: int | None = None, **engine_kwargs,
) -> Engine:
    """`model` a GGUF file, an HF folder (converted once), or None for the embedded SmolLM2 (Q8_0 copy)."""
    from ..gguf.files import gguf_tokenizer, resolve_gguf
    from .llamacpp.runner import LlamaCppRunner

    gguf_file = resolve_gguf(model)
    device = device or default_device()
    dtype = default_dtype(device)
    has_heads = heads is not None
    runner = LlamaCppRunner(gguf_file, max_slots=max_batch, n_ctx=n_ctx, exact=exact, n_threads=n_threads,
                            n_gpu_layers=n_gpu_layers, device=device, dtype=dtype, hidden=has_heads,
                            kv_type=kv_type, v_type=v_type, kv_budget_bytes=kv_budget_bytes)
    heads_obj = _heads(heads, runner.hidden_size, device, dtype)
    if heads_obj is None and speculation not in ("adaptive", "off"):
        raise ValueError(f"speculation {speculation!r} needs Medusa heads")
    tokenizer = gguf_tokenizer(gguf_file)
    name = engine_kwargs.pop("model_name", None) or (EMBEDDED_NAME if model is None else Path(str(model)).stem)
    return Engine(runner, tokenizer, heads_obj, speculation=speculation, max_batch=max_batch,
                  model_name=name, **engine_kwargs)
