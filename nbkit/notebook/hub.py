"""Hugging Face from a notebook: log in, then `prepare` downloads the model and heads the plan needs
(only the files needed, through nbkit.hub) and converts the model for the plan's engine.

The hub calls themselves live in nbkit.hub (the engine fetches through them too); the names the
notebooks and tests use are importable from here as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..hub import (  # noqa: F401  (the notebooks' names: `from nbkit.notebook.hub import login, prepare`)
    Login,
    download_config,
    download_heads,
    download_model,
    fetch_heads,
    fetch_model,
    is_hub_id,
    local_dir_for,
    login,
    token_source,
)
from ..models import EMBEDDED_NAME, is_embedded


@dataclass
class HeadsInfo:
    path: Path
    n_heads: int  # counted in the weights
    n_layers: int
    own_lm_head: bool
    config_heads: int | None  # what config.json claims (FasterDecoding's vicuna-7b file says 2, holds 5)

    def __repr__(self) -> str:
        note = ""
        if self.config_heads is not None and self.config_heads != self.n_heads:
            note = f" (config.json says {self.config_heads}; the weights win)"
        kind = "own lm_head each" if self.own_lm_head else "shared lm_head"
        return f"Medusa heads at {self.path}: {self.n_heads} heads{note}, {self.n_layers} ResBlock each, {kind}"


def inspect_heads(heads_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> HeadsInfo:
    """Count the heads in the weights and check they fit the model, reading only keys and shapes (the
    checkpoint is memory-mapped): the engine loads the heads once, later, straight into its dtype."""
    import json

    from ..medusa.heads import HeadsFormatError, infer_layout, read_state_dict

    heads_dir = Path(heads_dir)
    state = read_state_dict(heads_dir)
    n_heads, n_layers, own = infer_layout(state)
    hidden = state["0.0.linear.weight"].shape[0]
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        config = json.loads((Path(model_dir) / "config.json").read_text())
        if config.get("hidden_size") not in (None, hidden):
            raise HeadsFormatError(f"the heads in {heads_dir} have hidden size {hidden}; the model has "
                                   f"{config['hidden_size']}: they belong to another base model")
        vocab = config.get("vocab_size")
        if own and vocab is not None and state[f"0.{n_layers}.weight"].shape[0] != vocab:
            raise HeadsFormatError(f"the heads in {heads_dir} predict {state[f'0.{n_layers}.weight'].shape[0]} "
                                   f"tokens; the model's vocabulary has {vocab}")
    config_file = heads_dir / "config.json" if heads_dir.is_dir() else heads_dir.parent / "config.json"
    claimed = json.loads(config_file.read_text()).get("medusa_num_heads") if config_file.is_file() else None
    return HeadsInfo(heads_dir, n_heads, n_layers, own, int(claimed) if claimed is not None else None)


# --- everything a server needs, from the notebook's parameters ------------------------------------


@dataclass
class Prepared:
    """What `start_server` takes: the model (folder, GGUF or None = embedded), the heads, the engine."""

    model: str | None
    heads: str | None
    engine: str
    heads_info: HeadsInfo | None = None
    build: object | None = None  # the background llama.cpp build (build_job.BuildJob) that serving waits for
    kv_budget_bytes: int | None = None  # the plan's KV budget (None: none, the cache grows on demand)

    def wait_for_engine(self) -> None:
        """Block until the engine's bindings are installed (the llama.cpp build runs in the background)."""
        from .build_job import wait_for

        wait_for(self.build)

    def cli_args(self) -> str:
        """The same choice as `python -m nbkit ...` options (serve, bench)."""
        import shlex

        args = ["--engine", self.engine]
        if self.model:
            args += ["--model", self.model]
        if self.heads:
            args += ["--heads", self.heads]
        return " ".join(shlex.quote(a) for a in args)

    def __repr__(self) -> str:
        lines = [f"engine : {self.engine}", f"model  : {self.model or 'embedded ' + EMBEDDED_NAME}",
                 f"heads  : {self.heads or 'none (plain decoding)'}"]
        if self.heads_info is not None:
            lines.append(f"         {self.heads_info!r}")
        return "\n".join(lines)


def serving_gguf(model_dir: str | os.PathLike, quantization: str) -> Path:
    """The GGUF the llama.cpp engine serves for the plan's quantization: converted once, quantized once,
    reused on re-runs (nbkit.gguf.convert does the work)."""
    from ..gguf.convert import convert

    q = (quantization or "f16").lower()
    if (outtype := _gguf_outtype(q)) is not None:  # the converter writes these directly (no F16 copy for Q8_0)
        return convert(model_dir, outtype=outtype)
    return convert(model_dir, outtype="f16", quantize_to=q.upper())


def _gguf_outtype(quantization: str | None) -> str | None:
    """The converter's own --outtype for this quantization, or None when it needs llama_model_quantize."""
    q = (quantization or "f16").lower()
    q = "f16" if q in ("none", "auto") else q
    return q if q in ("f32", "f16", "bf16", "q8_0") else None


def prepare(model, heads, plan, mirror: str | os.PathLike | None = None, build=None) -> Prepared:
    """Download the model and heads (only what is needed) and convert the model for the plan's engine.

    `build`: the background llama.cpp build (ensure_engine); it goes on meanwhile, and only a quantization
    that needs the bindings (Q4_K_M ...) waits for it here. Serving waits for it in any case."""
    engine = plan.engine
    if build is not None:
        build.check()  # a build that already failed stops here, not after the download
    if is_embedded(model):
        model_arg = None  # both engines know the embedded SmolLM2 (HF folder or its shipped GGUF)
    elif str(model).endswith(".gguf"):
        model_arg = str(model)
    else:
        model_dir = download_model(str(model), mirror=mirror)
        if engine == "llamacpp" and build is not None and _gguf_outtype(plan.quantization) is None:
            build.wait()  # quantizing goes through the bindings
        model_arg = str(serving_gguf(model_dir, plan.quantization) if engine == "llamacpp" else model_dir)
    info = None
    if heads in (None, "", "none", "embedded"):
        heads_arg = heads or None  # None: the engine's default (the shipped heads with the embedded model)
    else:
        heads_dir = download_heads(str(heads), mirror=mirror)
        model_dir_for_check = model_arg if model_arg and Path(model_arg).is_dir() else None
        info = inspect_heads(heads_dir, model_dir_for_check)
        heads_arg = str(heads_dir)
    if build is not None:
        print(build.status_line())
    return Prepared(model_arg, heads_arg, engine, info, build, getattr(plan, "kv_budget_bytes", None))
