"""Where the notebook runs: Colab or not, which GPU, and what fits in its memory.

`detect()` gathers the facts, `summary()` puts them on one screen, `choose_plan()` turns GPU memory
into a quantization and an engine, and `param()` lets a notebook's parameters cell be overridden
from the environment (papermill overrides the same variables by injecting a cell after it).

`$NBKIT_GPU` replaces the GPU probe with an answer in nvidia-smi's CSV form ("name, total MiB, free MiB,
compute capability"; `;` between GPUs), e.g. `NBKIT_GPU="Tesla T4, 15360, 15095, 7.5"`. The plan is then
made for that GPU while everything runs on this machine as it is (engines build and load for the CPU):
CI uses it to run a T4's or an A100's Run all on a CPU.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..colab import colab_secret, in_colab  # noqa: F401  (notebook helpers import them from env)

# The plan's arithmetic lives in memory.py; these names stay importable from here (notebooks and fit.py use env).
from .memory import GIB, MAX_BATCH, VICUNA_7B, kv_budget_gib, sizes_from_shapes  # noqa: F401


def secret(name: str) -> tuple[str | None, str]:
    """(value, where it came from) for a token: the Colab secret `name` first, then the environment."""
    value = colab_secret(name)
    if value:
        return value, f"Colab secret {name}"
    value = (os.environ.get(name) or "").strip()
    if value:
        return value, f"environment variable {name}"
    return None, "nowhere"


def param(name: str, default):
    """A notebook parameter: $NBKIT_<NAME> when set (cast to the default's type), else `default`."""
    raw = os.environ.get("NBKIT_" + name.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if default is None and raw.strip().lower() in ("", "none", "null"):
        return None
    return raw


@dataclass
class Gpu:
    name: str
    total_gib: float
    free_gib: float
    capability: tuple[int, int]  # CUDA compute capability, e.g. (7, 5) on a T4
    simulated: bool = False  # described by $NBKIT_GPU, not present: nothing may run on it

    @property
    def arch(self) -> str:
        """The CMAKE_CUDA_ARCHITECTURES value for this card (75 for a T4, 80 for an A100)."""
        return f"{self.capability[0]}{self.capability[1]}"


@dataclass
class Environment:
    colab: bool
    python: str
    torch: str | None
    cuda: str | None
    gpus: list[Gpu] = field(default_factory=list)
    cpus: int = 1
    ram_gib: float | None = None
    disk_free_gib: float | None = None

    @property
    def gpu(self) -> Gpu | None:
        return self.gpus[0] if self.gpus else None

    def __repr__(self) -> str:  # a notebook cell that ends with the object shows the summary
        return summary(self)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            major, _, minor = parts[3].partition(".")
            gpus.append(Gpu(parts[0], float(parts[1]) / 1024, float(parts[2]) / 1024, (int(major), int(minor or 0))))
        except ValueError:
            continue
    return gpus


def _gpus_from_torch() -> tuple[list[Gpu], str | None, str | None]:
    try:
        import torch
    except ImportError:
        return [], None, None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:
                free, total = props.total_memory, props.total_memory
            gpus.append(Gpu(props.name, total / GIB, free / GIB, (props.major, props.minor)))
    return gpus, torch.__version__, torch.version.cuda


def _gpus_from_nvidia_smi() -> list[Gpu]:
    """For a torch without CUDA on a GPU machine: the driver still tells us what is there."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return parse_nvidia_smi(out)


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return None


def simulated_gpus(spec: str | None = None) -> list[Gpu]:
    """The GPUs that $NBKIT_GPU (or `spec`) describes, in nvidia-smi's CSV form; [] when it is not set."""
    spec = os.environ.get("NBKIT_GPU", "") if spec is None else spec
    gpus = parse_nvidia_smi(spec.replace(";", "\n"))
    if spec.strip() and not gpus:
        raise ValueError(f"NBKIT_GPU={spec!r} is not 'name, total MiB, free MiB, compute capability' "
                         "(e.g. 'Tesla T4, 15360, 15095, 7.5')")
    for gpu in gpus:
        gpu.simulated = True
    return gpus


def detect() -> Environment:
    """The facts that decide what this runtime can serve."""
    gpus, torch_version, cuda = _gpus_from_torch()
    gpus = simulated_gpus() or gpus
    if not gpus:
        gpus = _gpus_from_nvidia_smi()
    from ..models import cache_dir

    return Environment(
        colab=in_colab(), python=platform.python_version(), torch=torch_version, cuda=cuda, gpus=gpus,
        cpus=os.cpu_count() or 1, ram_gib=_ram_gib(), disk_free_gib=shutil.disk_usage(cache_dir()).free / GIB,
    )


# --- what fits ------------------------------------------------------------------------------------
# Bytes per parameter of a llama-architecture GGUF (vicuna-7b: F16 12.6 GiB, Q8_0 6.7, Q4_K_M 3.8 for 6.74e9).
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q4_k_m": 0.605}
CUDA_OVERHEAD_GIB = 1.0  # CUDA context (~0.5 GiB), cuBLAS workspaces and the allocator's slack
TORCH_DTYPES = ("f16", "bf16", "f32", "none")  # what the torch engine can load ("none": its default dtype)
MIN_KV_TOKENS = 4 * 2048  # the most faithful weights must leave KV for 4 full vicuna contexts


class PlanError(ValueError):
    """A plan that cannot run on this machine, refused with the reason before anything is downloaded."""


@dataclass
class Plan:
    engine: str  # "torch" (transformers fp16 + heads) or "llamacpp" (a GGUF + heads)
    quantization: str  # "f16" | "q8_0" | "q4_k_m"
    weights_gib: float
    heads_gib: float
    kv_gib: float  # the KV budget: what is left after everything else, up to every slot's full context
    memory_gib: float | None  # what the plan was made for (None = CPU)
    reason: str
    workspace_gib: float = 0.0  # the widest verify pass's activations and logits
    simulated: bool = False  # made for a GPU that $NBKIT_GPU describes: the engines run on this CPU as they are

    @property
    def need_gib(self) -> float:
        return self.weights_gib + self.heads_gib + self.kv_gib + self.workspace_gib + CUDA_OVERHEAD_GIB

    @property
    def kv_budget_bytes(self) -> int | None:
        """What the engine may allocate for KV (load_engine's kv_budget_bytes); None on a CPU (grows on demand)."""
        return None if self.memory_gib is None or self.simulated else int(self.kv_gib * GIB)

    def fits(self) -> bool:
        return self.memory_gib is None or self.need_gib <= self.memory_gib + 1e-9

    def __repr__(self) -> str:
        return f"Plan(engine={self.engine!r}, quantization={self.quantization!r}): {self.reason}"


def choose_plan(
    gpu_total_gib: float | None, params_b: float | None = None, heads_gib: float | None = None,
    kv_mib_per_token: float | None = None, n_ctx: int | None = None, workspace_gib: float | None = None,
    min_kv_tokens: int = MIN_KV_TOKENS,
) -> Plan:
    """The most faithful weights that leave `min_kv_tokens` of KV after the weights, the Medusa heads, the verify
    workspace and the CUDA overhead; the KV budget is then all that is left (up to every slot's full context).

    Sizes not given are vicuna-7b's with FasterDecoding's 5 heads (sizes_from_shapes(VICUNA_7B)).
    F16 runs in the torch engine (transformers, exact); quantized weights run in the llama.cpp engine.
    A T4 (15 GiB) cannot hold F16 (12.6) + heads (1.4) + KV, so it gets Q8_0; an A100 or L4 gets F16.
    """
    given = {"params_b": params_b, "heads_gib": heads_gib, "kv_mib_per_token": kv_mib_per_token, "n_ctx": n_ctx,
             "workspace_gib": workspace_gib}
    sizes = {**sizes_from_shapes(VICUNA_7B), **{k: v for k, v in given.items() if v is not None}}
    per_token, n_ctx, work = sizes["kv_mib_per_token"], sizes["n_ctx"], sizes["workspace_gib"]
    heads_gib = sizes["heads_gib"]

    def weights_of(quant: str) -> float:
        return sizes["params_b"] * 1e9 * BYTES_PER_PARAM[quant] / GIB

    if gpu_total_gib is None:
        return Plan("llamacpp", "q4_k_m", weights_of("q4_k_m"), heads_gib, kv_budget_gib(1e9, per_token, n_ctx),
                    None, "no GPU: the smallest good GGUF on the CPU with llama.cpp", work)
    for quant in ("f16", "q8_0", "q4_k_m"):
        left = gpu_total_gib - weights_of(quant) - heads_gib - work - CUDA_OVERHEAD_GIB
        if left * 1024 / per_token >= min_kv_tokens:
            kv = kv_budget_gib(left, per_token, n_ctx)
            plan = Plan("torch" if quant == "f16" else "llamacpp", quant, weights_of(quant), heads_gib, kv,
                        gpu_total_gib, "", work)
            plan.reason = _arithmetic(plan) + f" ({int(kv * 1024 / per_token)} KV tokens)"
            return plan
    spare = max(gpu_total_gib - weights_of("q4_k_m") - heads_gib - work - CUDA_OVERHEAD_GIB, 0.0)
    tokens = int(spare * 1024 / per_token)
    verdict = "tight" if tokens >= 2048 else "does NOT fit (use a bigger GPU or a smaller model)"
    return Plan("llamacpp", "q4_k_m", weights_of("q4_k_m"), heads_gib, kv_budget_gib(spare, per_token, n_ctx),
                gpu_total_gib, f"{verdict}: Q4_K_M leaves {spare:.1f} GiB for the KV cache ({tokens} tokens in all)",
                work)


def _arithmetic(plan: Plan, against: str = "of") -> str:
    return (f"{plan.weights_gib:.1f} GiB weights + {plan.heads_gib:.1f} heads + {plan.kv_gib:.1f} KV + "
            f"{plan.workspace_gib:.1f} workspace + {CUDA_OVERHEAD_GIB:.0f} overhead = {plan.need_gib:.1f} GiB "
            f"{against} {plan.memory_gib:.1f} GiB")


def sizes_from_config(model_dir: str | os.PathLike | None, n_heads: int = 5) -> dict:
    """choose_plan() sizes of a llama-style model from its config.json, without loading it ({} if unknown)."""
    import json

    file = Path(model_dir) / "config.json" if model_dir else None
    if file is None or not file.is_file():
        return {}
    try:
        return sizes_from_shapes(json.loads(file.read_text()), n_heads)
    except KeyError:
        return {}


def resolve_plan(
    engine: str = "auto", quantization: str = "auto", model_dir: str | os.PathLike | None = None,
    env: Environment | None = None, sizes: dict | None = None,
) -> Plan:
    """The plan for this runtime; explicit notebook parameters ("torch", "q8_0", ...) win over "auto".

    The sizes come from `sizes` (choose_plan's keywords: fit.plan_for reads them from a hub repo's
    config.json alone), else `model_dir`'s config.json, else vicuna-7b's. A plan that cannot fit the GPU
    raises PlanError, so the notebook stops before it downloads anything."""
    env = env or detect()
    sizes = sizes if sizes is not None else sizes_from_config(model_dir)
    gpu_gib = env.gpu.total_gib if env.gpu else None
    auto = choose_plan(gpu_gib, **sizes)
    auto.simulated = bool(env.gpu and env.gpu.simulated)
    if (engine, quantization) == ("auto", "auto"):
        return _refuse_if_too_big(auto, env)
    engine = auto.engine if engine == "auto" else engine
    if engine == "torch":
        quantization = _torch_dtype(quantization, gpu_gib is not None)
    else:
        quantization = auto.quantization if quantization == "auto" else quantization
    chosen = Plan(**{**vars(auto), "engine": engine, "quantization": quantization})
    full = {**sizes_from_shapes(VICUNA_7B), **sizes}
    bytes_per = BYTES_PER_PARAM.get(quantization.lower(), BYTES_PER_PARAM["f16" if gpu_gib else "f32"])
    chosen.weights_gib = full["params_b"] * 1e9 * bytes_per / GIB  # the weights this engine really loads
    if gpu_gib is not None:  # the KV budget is what these weights leave (at least a 128-token slot each, or refused)
        left = gpu_gib - chosen.weights_gib - chosen.heads_gib - chosen.workspace_gib - CUDA_OVERHEAD_GIB
        least = MAX_BATCH * 128 * full["kv_mib_per_token"] / 1024
        chosen.kv_gib = max(kv_budget_gib(left, full["kv_mib_per_token"], full["n_ctx"]), least)
    chosen.reason = f"set by the parameters (auto would choose {auto.engine}/{auto.quantization}: {auto.reason})"
    return _refuse_if_too_big(chosen, env)


def _torch_dtype(quantization: str, gpu: bool) -> str:
    """The torch engine loads transformers weights as they are (f16 on a GPU): a GGUF quantization is a mistake."""
    q = quantization.lower()
    if q == "auto":
        return "f16" if gpu else "f32"
    if q not in TORCH_DTYPES:
        raise PlanError(f"ENGINE='torch' loads {'f16' if gpu else 'f32'} weights with transformers; the quantization "
                        f"{quantization!r} is for the llama.cpp engine: set ENGINE='llamacpp' (or 'auto').")
    return q


def _refuse_if_too_big(plan: Plan, env: Environment) -> Plan:
    if plan.fits():
        return plan
    gpu = env.gpu
    raise PlanError(
        f"{plan.engine}/{plan.quantization} does not fit {gpu.name if gpu else 'this GPU'}: {_arithmetic(plan, '>')}. "
        "Nothing was downloaded. Use ENGINE='auto' and "
        "QUANTIZATION='auto' (the best plan that fits), a smaller quantization with ENGINE='llamacpp', or a GPU "
        "with more memory (Runtime > Change runtime type).")


def summary(env: Environment | None = None) -> str:
    """One screen: runtime, GPU, memory, and the llama.cpp CUDA architecture to build for."""
    env = env or detect()
    lines = [
        f"runtime : {'Google Colab' if env.colab else 'local / other'}  (Python {env.python}, {env.cpus} CPUs"
        + (f", {env.ram_gib:.1f} GiB RAM" if env.ram_gib else "")
        + (f", {env.disk_free_gib:.0f} GiB disk free)" if env.disk_free_gib is not None else ")"),
        f"torch   : {env.torch or 'not installed'}" + (f"  (CUDA {env.cuda})" if env.cuda else "  (CPU build)"),
    ]
    if not env.gpus:
        lines.append("GPU     : none — the embedded model runs on CPU; a 7B model needs a GPU runtime "
                     "(Runtime > Change runtime type > T4 GPU)")
    for i, gpu in enumerate(env.gpus):
        lines.append(f"GPU {i}   : {gpu.name}, {gpu.total_gib:.1f} GiB ({gpu.free_gib:.1f} free), "
                     f"compute {gpu.capability[0]}.{gpu.capability[1]} -> CMAKE_CUDA_ARCHITECTURES={gpu.arch}"
                     + ("  [simulated by $NBKIT_GPU: the plan is made for it, everything runs on the CPU]"
                        if gpu.simulated else ""))
    return "\n".join(lines)


def show_summary(env: Environment | None = None) -> Environment:
    """Print the summary and return the facts for later cells."""
    env = env or detect()
    print(summary(env))
    return env
