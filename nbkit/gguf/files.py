"""Which GGUF file the llama.cpp engine serves (embedded, a file, or a converted HF folder) and its tokenizer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("nbkit.engine")

# The embedded SmolLM2 ships as Q4_1, which has no fast batched CPU kernels on x86 in this llama.cpp.
# A Q8_0 copy holds Q4_1's values almost exactly and decodes batches faster; Q4_0 batches faster still
# but agrees too little with Q4_1 (docs/measurements.md).
EMBEDDED_FORMAT = "Q8_0"


def embedded_gguf(fmt: str = EMBEDDED_FORMAT) -> Path:
    """The embedded model for the llama.cpp engine: the shipped Q4_1 file, or a copy requantized once
    into the cache through the bindings (a few seconds)."""
    from ..models import cache_dir, embedded_gguf_path
    from .convert import quantize

    shipped = embedded_gguf_path()
    if fmt.upper() == "Q4_1":
        return shipped
    copy = cache_dir() / "gguf" / f"{shipped.stem.rsplit('.', 1)[0]}.{fmt.upper()}.gguf"
    if copy.is_file() and copy.stat().st_mtime >= shipped.stat().st_mtime:
        return copy
    return quantize(shipped, copy, fmt, allow_requantize=True)


def resolve_gguf(model: str | os.PathLike | None) -> Path:
    """None/'embedded' -> the embedded SmolLM2 (Q8_0 copy); a .gguf file as is; an HF folder -> converted once."""
    from ..models import cache_dir, is_embedded

    if is_embedded(model):
        return embedded_gguf()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    if path.is_dir():
        from .convert import convert

        return convert(path, cache_dir() / "gguf" / f"{path.name}.f16.gguf", outtype="f16")
    raise FileNotFoundError(f"{model} is neither a .gguf file nor a transformers model folder")


def gguf_tokenizer(gguf_file: Path):
    """The HF tokenizer (with the chat template) stored in a GGUF, cached as a folder after the first load."""
    from transformers import AutoTokenizer

    from ..models import cache_dir

    stat = gguf_file.stat()
    saved = cache_dir() / "tokenizers" / f"{gguf_file.stem}-{stat.st_size}"
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    try:
        tokenizer.save_pretrained(saved)
    except OSError:
        log.warning("could not cache the tokenizer in %s", saved)
    return tokenizer
