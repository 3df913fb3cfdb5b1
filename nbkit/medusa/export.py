"""`python -m nbkit export HEADS --to vllm OUT_DIR`: the same heads for a multi-GPU/multi-node engine.

The format details live in nbkit/medusa/vllm.py; this module finds the heads and the base model's
lm_head (nbkit's own heads share it) and is the command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..hub import resolve_heads
from ..models import is_embedded
from .heads import HeadsFormatError
from .vllm import VLLM_VERSION, BaseLMHead, export_vllm, serve_command

EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what vLLM loads for the embedded model
DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_heads_path(heads: str | Path | None) -> Path:
    """The heads to export (hub.resolve_heads: a folder, a file, 'embedded' or a hub id), which must exist."""
    path = resolve_heads(heads)
    if path is None or not path.exists():
        raise FileNotFoundError(f"Medusa heads not found: {heads}")
    return path


def _model_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {**config, **config.get("text_config", {})}


def _read_tensor(folder: Path, names: tuple[str, ...]) -> tuple[str, torch.Tensor] | None:
    """The first of `names` found in the folder's safetensors files, read without loading the model."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if name in keys:
                    return name, f.get_tensor(name)
    return None


def read_base_lm_head(model: str | Path | None, name: str | None = None, weight: bool = True) -> BaseLMHead:
    """The base model's config vocab_size and (`weight=True`) its lm_head or tied input embedding.

    `model`: a local transformers folder, a .gguf, 'embedded', or a hub id (then read with transformers)."""
    from ..models import load_model, resolve_model_dir

    embedded = is_embedded(model)
    where = resolve_model_dir(model)
    serve_name = name or (EMBEDDED_BASE if embedded else str(model))
    if isinstance(where, Path):
        config = _model_config(where)
        vocab = int(config["vocab_size"])
        if not weight:
            return BaseLMHead(None, vocab, serve_name)
        if _read_tensor(where, ("lm_head.bias",)) is not None:
            raise HeadsFormatError("the base model's lm_head has a bias, which vLLM's Medusa lm_head cannot hold")
        names = ("lm_head.weight",)
        if config.get("tie_word_embeddings", False):
            names += ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
        found = _read_tensor(where, names)
        if found is not None:
            return BaseLMHead(found[1], vocab, serve_name)
    if not weight:
        from transformers import AutoConfig

        return BaseLMHead(None, int(AutoConfig.from_pretrained(where).get_text_config().vocab_size), serve_name)
    base, _ = load_model(where, dtype=torch.bfloat16)
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise HeadsFormatError("the base model's lm_head has a bias, which vLLM's Medusa lm_head cannot hold")
    vocab = int(base.config.get_text_config().vocab_size)
    return BaseLMHead(head.weight.detach().clone(), vocab, serve_name)


def export_for_vllm(heads: str | Path = "embedded", out_dir: str | Path = "vllm-medusa",
                    model: str | Path | None = None, base_name: str | None = None, full_vocab: bool = False,
                    dtype: str = "auto", tensor_parallel: int = 1, speculative_tokens: int | None = None) -> Path:
    """Export heads for vLLM. The base model (default: the embedded one for the embedded heads) gives the
    vocabulary check and, for heads that share it, the lm_head."""
    from .heads import infer_layout, read_state_dict

    path = resolve_heads_path(heads)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    _, _, own = infer_layout(read_state_dict(path))
    if model is None and heads is not None and is_embedded(heads):
        model = "embedded"
    if model is not None:
        base = read_base_lm_head(model, base_name, weight=not own)
    else:
        base = BaseLMHead(None, None, base_name or "BASE_MODEL")
    return export_vllm(path, out_dir, base, full_vocab, DTYPES[dtype], tensor_parallel, speculative_tokens)


def cmd_export(args) -> int:
    if args.to != "vllm":
        raise ValueError(f"--to {args.to}: only 'vllm' is supported")
    out = export_for_vllm(args.heads, args.out_dir, args.model, args.base_name, args.full_vocab, args.dtype,
                          args.tensor_parallel_size, args.num_speculative_tokens)
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out}/config.json, model.safetensors and README.md for vLLM {VLLM_VERSION}: "
          f"{config['num_heads']} heads, vocabulary {config['vocab_size']}"
          + (f", proposals from {config['truncated_vocab_size']} tokens" if config["truncated_vocab_size"] else ""))
    base = args.base_name or (args.model if args.model not in (None, "embedded") else EMBEDDED_BASE)
    print(serve_command(base, out.resolve(), args.num_speculative_tokens or config["num_heads"],
                        args.tensor_parallel_size, config["truncated_vocab_size"] is not None))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("export", help="export Medusa heads for another engine (vLLM)",
                       description="Write Medusa heads (FasterDecoding .pt or nbkit safetensors) in vLLM's format.")
    p.add_argument("heads", help="heads folder or file, or 'embedded'")
    p.add_argument("out_dir", help="output folder (config.json, model.safetensors, README.md)")
    p.add_argument("--to", required=True, help="target engine: vllm")
    p.add_argument("--model", default=None, help="base model (folder, .gguf, hub id or 'embedded'): its vocabulary "
                   "is checked and, for heads that share it, its lm_head is written")
    p.add_argument("--base-name", default=None, help="the base model's name in the printed vllm command")
    p.add_argument("--full-vocab", action="store_true", help="propose from the full vocabulary, not the heads' "
                   "proposal vocabulary (no token_map, no extra vLLM flag)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="tensor dtype (auto: as stored)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="for the printed command")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="K for the printed command "
                   "(default: the number of heads)")
    p.set_defaults(func=cmd_export)


if __name__ == "__main__":  # the same command as `python -m nbkit export` (nbkit.cli registers it there)
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nbkit")
    register_cli(parser.add_subparsers())
    parsed = parser.parse_args(["export", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
