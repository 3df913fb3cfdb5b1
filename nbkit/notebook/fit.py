"""What to serve on this machine: model sizes read before downloading, and the CPU fallback.

`plan_for` sizes the plan (env.resolve_plan) from `model_sizes(MODEL)`: the config.json of a hub repo is a
few kilobytes, so a plan that cannot fit is refused before gigabytes are fetched. `fit_model` keeps a machine
without a GPU from downloading 13.5 GB to run a 7B model on a CPU: it serves the embedded model instead,
and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..models import is_embedded
from .env import CUDA_OVERHEAD_GIB, Environment, Plan, PlanError, detect, resolve_plan, sizes_from_config
from .hub import download_config
from .variants import match_heads

CPU_MAX_PARAMS_B = 2.0  # above this, a model on a CPU is too slow to be the default (vicuna-7b: 6.74)
MIN_KV_TOKENS = 2048  # one full vicuna-v1.3 conversation: choose_plan itself says "does NOT fit" below it


# SmolLM2-135M-Instruct, the embedded model (30 layers, hidden 576, 3 KV heads of 64, vocab 49152).
EMBEDDED_SIZES = {"params_b": 0.135, "heads_gib": 0.02, "kv_mib_per_token": 2 * 30 * 192 * 2 / 2**20}


def model_sizes(model: str | os.PathLike | None) -> dict:
    """choose_plan() sizes for a notebook's MODEL: the embedded model's, a folder's or a hub repo's config.json
    (only that file is fetched), else {} (vicuna-7b's defaults)."""
    if model is None:
        return {}
    if is_embedded(model):
        return dict(EMBEDDED_SIZES)
    if str(model).endswith(".gguf"):
        return {}
    try:
        return sizes_from_config(model if Path(str(model)).is_dir() else download_config(str(model)))
    except Exception as err:  # noqa: BLE001 -- offline, gated, a typo: the plan falls back to vicuna-7b's sizes
        print(f"(could not read {model}'s config.json: {type(err).__name__}; planning with vicuna-7b's sizes)")
        return {}


def fit_model(model, heads, env: Environment | None = None, allow_cpu: bool = False) -> tuple:
    """(model, heads) to serve here: on a machine without a GPU a big model (vicuna-7b: 13.5 GB to download,
    far too slow on a CPU) becomes the embedded SmolLM2 with its own heads, with a printed note.

    `allow_cpu=True` (notebook parameter ALLOW_CPU, or $NBKIT_ALLOW_CPU=1) keeps the requested model.
    HEADS="auto" becomes the published heads of MODEL, and heads published for another base are refused
    (variants.match_heads), on any machine."""
    heads = match_heads(model, heads)
    env = env or detect()
    if env.gpu is not None or allow_cpu:
        return model, heads
    params_b = model_sizes(model).get("params_b", 6.74)
    if params_b <= CPU_MAX_PARAMS_B:
        return model, heads
    print(f"No GPU here: serving the embedded SmolLM2-135M-Instruct (and its Medusa heads) instead of {model} "
          f"({params_b:.1f} B parameters: a {params_b * 2:.1f} GB download, far too slow on a CPU). To run it "
          "anyway set ALLOW_CPU = True (or $NBKIT_ALLOW_CPU=1); for a GPU: Runtime > Change runtime type > T4 GPU.")
    return "embedded", "embedded"


def plan_for(engine: str = "auto", quantization: str = "auto", env: Environment | None = None,
             model: str | os.PathLike | None = None) -> Plan:
    """env.resolve_plan for the notebook's MODEL, sized from its config.json (only that file is fetched).

    Raises env.PlanError, with the arithmetic, for a plan that cannot fit the GPU, or whose KV cache would
    not hold one MIN_KV_TOKENS conversation."""
    env = env or detect()
    sizes = model_sizes(model)
    return _refuse_without_one_conversation(resolve_plan(engine, quantization, env=env, sizes=sizes), sizes, env)


def _refuse_without_one_conversation(plan: Plan, sizes: dict, env: Environment) -> Plan:
    """choose_plan's last resort gives the KV cache whatever memory is left and calls fewer than 2048 tokens
    "does NOT fit", yet that plan passes Plan.fits() (its KV is the remainder): refuse it, with the arithmetic."""
    if plan.memory_gib is None:
        return plan
    per_token = sizes.get("kv_mib_per_token", 0.5)  # choose_plan's default: vicuna-7b's f16 K and V
    tokens = int(plan.kv_gib * 1024 / per_token)
    if tokens >= MIN_KV_TOKENS:
        return plan
    raise PlanError(
        f"{plan.engine}/{plan.quantization} does not fit {env.gpu.name if env.gpu else 'this GPU'}: "
        f"{plan.memory_gib:.1f} GiB - {plan.weights_gib:.1f} weights - {plan.heads_gib:.1f} heads - "
        f"{CUDA_OVERHEAD_GIB:.0f} overhead leaves {plan.kv_gib:.1f} GiB of KV cache = {tokens} tokens at "
        f"{per_token:.2f} MiB each, fewer than one {MIN_KV_TOKENS}-token conversation. Nothing was downloaded. "
        "Use a GPU with more memory (Runtime > Change runtime type) or a smaller model.")
