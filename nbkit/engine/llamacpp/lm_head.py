"""The base model's lm_head read out of a GGUF, for the Medusa heads' proposals (torch, not llama.cpp)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def gguf_output_weight(gguf_file: str | os.PathLike) -> np.ndarray:
    """The output projection [V, H] dequantized from the GGUF (the tied token embeddings if there is no
    output.weight), rounded to fp16 (it only feeds the heads' proposals) and returned as fp32. Cached:
    dequantizing in numpy takes seconds, loading the cached copy a fraction of one."""
    from ...models import cache_dir

    gguf_file = Path(gguf_file)
    stat = gguf_file.stat()
    cached = cache_dir() / "lm_heads" / f"{gguf_file.stem}-{stat.st_size}-{int(stat.st_mtime)}.npy"
    if cached.is_file():
        return np.load(cached).astype(np.float32)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(gguf_file)).tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None:
        raise ValueError(f"{gguf_file} has neither output.weight nor token_embd.weight")
    weight = np.asarray(dequantize(tensor.data, tensor.tensor_type)).reshape(-1, int(tensor.shape[0]))
    weight = weight.astype(np.float16)  # the same values whether cached or not
    with contextlib.suppress(OSError):  # a read-only cache only costs time
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, weight)
        tmp.rename(cached)
    return weight.astype(np.float32)


def gguf_lm_head(gguf_file: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Linear:
    """The base model's lm_head as a dense torch Linear(H, V) (shared-lm_head Medusa heads need it)."""
    weight = gguf_output_weight(gguf_file)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data = torch.from_numpy(weight)
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


class Int8LmHead(nn.Module):
    """The lm_head for the heads' proposals on a CPU: int8 weights, fp32 in and out.

    The dense fp32 [V, H] matrix is read from memory for every call (on a CPU that costs more than
    decoding a token); int8 is a quarter of the bytes and fbgemm's kernel is much faster
    (docs/measurements.md). Proposals only decide what gets verified, never what is emitted, so the rounding
    costs at most a little acceptance. Falls back to bf16 where torch has no dynamic quantization.
    """

    def __init__(self, dense: nn.Linear):
        super().__init__()
        import warnings

        self.out_features = dense.out_features
        self._dense_weight = dense.weight.detach()  # kept (shared, not copied) for sliced()

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization announces its own deprecation
                from torch.ao.quantization import quantize_dynamic

                self.linear = quantize_dynamic(nn.Sequential(dense.float()), {nn.Linear}, dtype=torch.qint8)
            self.cast = torch.float32
        except (ImportError, AttributeError, RuntimeError):
            self.linear, self.cast = dense.to(torch.bfloat16), torch.bfloat16

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.cast)).float()

    def sliced(self, rows: torch.Tensor) -> Int8LmHead:
        """The same kind of lm_head over a subset of the vocabulary (the heads' proposal vocabulary)."""
        weight = self._dense_weight.float()[rows]
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        dense.weight.data = weight.contiguous()
        return Int8LmHead(dense)
