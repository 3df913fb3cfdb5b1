"""Notebook side of scaling out: the heads in use, exported for vLLM (to a folder or Google Drive),
and the `vllm serve` commands for one machine with N GPUs or several machines with Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .env import in_colab

DRIVE_ROOT = Path("/content/drive")


@dataclass
class Exported:
    path: Path
    config: dict
    command: str  # one machine

    def __repr__(self) -> str:
        vocab = (f", proposals from {self.config['truncated_vocab_size']} tokens (token_map)"
                 if self.config["truncated_vocab_size"] else "")
        lm_head = "shared lm_head (copied in)" if self.config["original_lm_head"] else "own lm_head each"
        return (f"vLLM Medusa heads in {self.path}: {self.config['num_heads']} heads x "
                f"{self.config['num_hidden_layers']} ResBlock(s), {lm_head}, vocabulary "
                f"{self.config['vocab_size']}{vocab}\n\n{self.command}")


def output_dir(out_dir: str | Path, drive: bool) -> Path:
    """`out_dir` as given, or under MyDrive (mounted on first use) when `drive`."""
    if not drive:
        return Path(out_dir)
    if not in_colab():
        raise ValueError("TO_DRIVE needs Google Colab (its Drive mount); outside Colab give a folder in OUT_DIR")
    if not (DRIVE_ROOT / "MyDrive").is_dir():
        from google.colab import drive as colab_drive  # type: ignore[import-not-found]

        colab_drive.mount(str(DRIVE_ROOT))
    return DRIVE_ROOT / "MyDrive" / Path(out_dir).name


def export_heads(model: str | None, heads: str | None, out_dir: str | Path = "vllm-medusa", drive: bool = False,
                 tensor_parallel: int = 1, speculative_tokens: int | None = None,
                 full_vocab: bool = False) -> Exported:
    """Export the heads this notebook serves (hub id, folder or the embedded ones) for vLLM."""
    import json

    from ..medusa.export import EMBEDDED_BASE, export_for_vllm
    from ..medusa.vllm import serve_command
    from ..models import is_embedded
    from .hub import download_heads
    from .variants import match_heads

    heads = match_heads(model, heads)  # "auto": the published heads of MODEL
    if heads is None:
        raise ValueError(f"no Medusa heads to export: {model} has no published heads; set HEADS to a hub id or folder")
    embedded_model = is_embedded(model)
    heads_path = "embedded" if is_embedded(heads) else str(download_heads(str(heads)))
    base_name = EMBEDDED_BASE if embedded_model else str(model)
    out = export_for_vllm(heads_path, output_dir(out_dir, drive), "embedded" if embedded_model else model,
                          base_name, full_vocab, "auto", tensor_parallel, speculative_tokens)
    config = json.loads((out / "config.json").read_text())
    k = speculative_tokens or config["num_heads"]
    command = serve_command(base_name, out.resolve(), k, tensor_parallel, config["truncated_vocab_size"] is not None)
    return Exported(out, config, command)


def show_commands(exported: Exported):
    """The README written next to the heads (commands for one machine and for Ray, and the trade-offs)."""
    from IPython.display import Markdown

    return Markdown((exported.path / "README.md").read_text())
