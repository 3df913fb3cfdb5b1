"""Medusa heads in vLLM's format: export (`python -m nbkit export HEADS --to vllm OUT_DIR`) and read back.

Checked against vLLM 0.32.0, the last release that ships Medusa (0.33.0 removed it):
`vllm/model_executor/models/medusa.py` (class Medusa, its load_weights) and
`vllm/transformers_utils/configs/medusa.py` (MedusaConfig). What that code does, and so what we write:

- config.json: `model_type: "medusa"`, `num_heads`, `num_hidden_layers` (ResBlocks per head),
  `hidden_size`, `vocab_size`, `truncated_vocab_size`. MedusaConfig.from_pretrained renames every
  key holding "num" and "heads"/"layers" onto num_heads/num_hidden_layers, so no other key may.
- ResBlock linears get a bias only when `medusa_fc_bias` is true (default false): Medusa's have one.
- Own lm_head per head (FasterDecoding): `lm_heads.{h}.weight [V, H]`.
- One lm_head for all heads: `original_lm_head: true` builds a single ParallelLMHead
  (truncated_vocab_size rows) that load_weights fills from `lm_heads.0.weight`. That is nbkit's
  shared-lm_head format, with the base model's lm_head copied in.
- A proposal vocabulary is vLLM's `token_map` (int64 ids) with `truncated_vocab_size = len(token_map)`:
  load_weights slices the lm_head rows by it and compute_logits scatters the head's logits into a
  -inf row of the full vocabulary, so the argmax is the proposal-vocabulary argmax nbkit computes.
  vLLM 0.32.0's default loader then fails its "every parameter loaded" check on `token_map` (the
  Medusa class registers it but does not report it loaded): serve with
  `--model-loader-extra-config '{"enable_weights_track": false}'`, or export with `full_vocab=True`.
- vLLM sets the draft's vocab_size to the target's when they differ, which breaks the lm_head shapes:
  `vocab_size` must be the base model's config vocab_size.
- vLLM builds `num_speculative_tokens` heads (its num_lookahead_tokens setter), so K <= num_heads.
- Proposals are the top-1 of each head: vLLM verifies a chain, never a tree.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .heads import PROPOSAL_FILE, HeadsFormatError, MedusaHeads, _infer_layout, read_proposal_vocab, read_state_dict

VLLM_VERSION = "0.32.0"
CONFIG_FILE, WEIGHTS_FILE, README_FILE = "config.json", "model.safetensors", "README.md"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class BaseLMHead:
    """The base model's output projection, which nbkit's shared-format heads reuse."""

    weight: torch.Tensor | None  # [V, H]; only read for heads that share it
    vocab_size: int | None  # the base model's config vocab_size (vLLM compares the draft's with it)
    name: str  # what `vllm serve` is given as the base model


# --- export -------------------------------------------------------------------------------------------
def vllm_state_dict(state: dict[str, torch.Tensor], base: BaseLMHead | None, proposal: torch.Tensor | None,
                    dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """nbkit/FasterDecoding head tensors -> (vLLM config dict, vLLM tensors). Raises HeadsFormatError
    for what vLLM cannot express."""
    n_heads, n_layers, own = _infer_layout(state)
    hidden = state["0.0.linear.weight"].shape[1]

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype or t.dtype).contiguous()

    out = {f"blocks.{h}.layers.{j}.{p}": cast(state[f"{h}.{j}.linear.{p}"])
           for h in range(n_heads) for j in range(n_layers) for p in ("weight", "bias")}
    if own:
        vocab = state[f"0.{n_layers}.weight"].shape[0]
        if base is not None and base.vocab_size is not None and base.vocab_size != vocab:
            raise HeadsFormatError(f"the heads' lm_heads have {vocab} rows but the base model's vocab_size is "
                                   f"{base.vocab_size}: vLLM would resize the draft vocabulary and fail to load")
        out.update({f"lm_heads.{h}.weight": cast(state[f"{h}.{n_layers}.weight"]) for h in range(n_heads)})
        truncated = None
        proposal = None  # own lm_heads propose from their full vocabulary in nbkit too
    else:
        if base is None or base.weight is None or base.vocab_size is None:
            raise HeadsFormatError("these heads share the base model's lm_head: give the base model (--model) "
                                   "so that its lm_head can be written into the export")
        if base.weight.shape != (base.vocab_size, hidden):
            raise HeadsFormatError(f"the base lm_head has shape {list(base.weight.shape)}, expected "
                                   f"[{base.vocab_size}, {hidden}] (vocab_size x the heads' hidden size)")
        out["lm_heads.0.weight"] = cast(base.weight)
        truncated = None
        if proposal is not None:
            if int(proposal.max()) >= base.vocab_size:
                raise HeadsFormatError(f"the proposal vocabulary holds token {int(proposal.max())}, but the base "
                                       f"model has {base.vocab_size} tokens")
            if len(proposal) < base.vocab_size:
                out["token_map"] = proposal.to(torch.int64).contiguous()
                truncated = len(proposal)
        vocab = base.vocab_size
    config = {
        "architectures": ["MedusaModel"], "model_type": "medusa",
        "hidden_size": hidden, "vocab_size": vocab, "num_heads": n_heads, "num_hidden_layers": n_layers,
        "truncated_vocab_size": truncated, "medusa_fc_bias": True, "original_lm_head": not own,
    }
    return config, out


def export_vllm(heads_path: str | Path, out_dir: str | Path, base: BaseLMHead | None = None,
                full_vocab: bool = False, dtype: torch.dtype | None = None,
                tensor_parallel: int = 1, speculative_tokens: int | None = None) -> Path:
    """Write `heads_path` (either format nbkit loads) into `out_dir` as vLLM loads it, with a README.md."""
    from safetensors.torch import save_file

    state = read_state_dict(heads_path)
    folder = Path(heads_path) if Path(heads_path).is_dir() else Path(heads_path).parent
    proposal = None
    if not full_vocab and (folder / PROPOSAL_FILE).is_file():
        proposal = read_proposal_vocab(folder / PROPOSAL_FILE)
    config, tensors = vllm_state_dict(state, base, proposal, dtype)
    k = speculative_tokens or config["num_heads"]
    if not 1 <= k <= config["num_heads"]:
        raise HeadsFormatError(f"num_speculative_tokens must be 1..{config['num_heads']} (one per head), not {k}")
    config["nbkit"] = {"vllm_version": VLLM_VERSION, "source": str(heads_path)}  # no "num" in these keys
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    base_name = base.name if base is not None else "BASE_MODEL"
    (out / README_FILE).write_text(launch_readme(out, base_name, config, tensor_parallel, k))
    return out


def serve_command(base_name: str, heads_dir: str | Path, k: int, tensor_parallel: int = 1,
                  token_map: bool = False, pipeline_parallel: int = 1, ray: bool = False) -> str:
    """The `vllm serve` command line for the base model with these heads as its speculative model."""
    spec = json.dumps({"method": "medusa", "model": str(heads_dir), "num_speculative_tokens": k})
    parts = ["vllm", "serve", shlex.quote(base_name), "--tensor-parallel-size", str(tensor_parallel)]
    if pipeline_parallel > 1:
        parts += ["--pipeline-parallel-size", str(pipeline_parallel)]
    if ray:
        parts += ["--distributed-executor-backend", "ray"]
    parts += ["--speculative-config", shlex.quote(spec)]
    if token_map:
        parts += ["--model-loader-extra-config", shlex.quote('{"enable_weights_track": false}')]
    return " ".join(parts)


def launch_readme(out: Path, base_name: str, config: dict, tensor_parallel: int, k: int) -> str:
    token_map = config["truncated_vocab_size"] is not None
    one = serve_command(base_name, out.resolve(), k, tensor_parallel, token_map)
    multi = serve_command(base_name, out.resolve(), k, tensor_parallel, token_map, pipeline_parallel=2, ray=True)
    lm_head = ("its own lm_head per head" if not config["original_lm_head"]
               else "the base model's lm_head (copied in, `original_lm_head: true`)")
    vocab_note = (f"Proposals come from nbkit's proposal vocabulary ({config['truncated_vocab_size']} tokens, "
                  "`token_map`). vLLM " + VLLM_VERSION + "'s loader then needs "
                  "`--model-loader-extra-config '{\"enable_weights_track\": false}'` (it counts `token_map` as a "
                  "weight it never loaded); export with `--full-vocab` to avoid that flag.\n"
                  if token_map else "Proposals come from the full vocabulary.\n")
    return f"""# Medusa heads for vLLM

Exported by nbkit for vLLM {VLLM_VERSION} (the last vLLM release with Medusa; 0.33.0 removed it):
{config['num_heads']} heads of {config['num_hidden_layers']} ResBlock(s) over hidden size {config['hidden_size']},
{lm_head}, vocabulary {config['vocab_size']}.
{vocab_note}
## One machine, N GPUs

```bash
pip install vllm=={VLLM_VERSION}
{one}
```

`num_speculative_tokens` (K) may be 1..{config['num_heads']}: vLLM runs the first K heads.
Keep `--tensor-parallel-size` at the number of GPUs; the heads follow the base model's tensor parallelism.

## Several machines (Ray)

```bash
ray start --head                              # on the first machine
ray start --address=HEAD_IP:6379              # on every other machine
{multi}
```

Copy this folder to the machines that run vLLM (every machine, same path, or shared storage) and put
that path in `"model"`.
`--pipeline-parallel-size` is the number of machines, `--tensor-parallel-size` the GPUs per machine.

## What changes from nbkit

- vLLM proposes the top-1 token of each head and verifies that chain; nbkit verifies a tree of top-k
  candidates, so vLLM accepts fewer tokens per step.
- nbkit's load-adaptive policy does not come along: vLLM speculates K tokens for every request at any load,
  and speculation can make a busy server slower.
"""


# --- read back ----------------------------------------------------------------------------------------
def expected_vllm_params(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape that vLLM 0.32.0's Medusa builds for this config (its __init__)."""
    h, n_heads, n_layers = config["hidden_size"], config["num_heads"], config["num_hidden_layers"]
    vocab = config["vocab_size"]
    truncated = config.get("truncated_vocab_size") or vocab
    params: dict[str, tuple[int, ...]] = {}
    for i in range(n_heads):
        for j in range(n_layers):
            params[f"blocks.{i}.layers.{j}.weight"] = (h, h)
            if config.get("medusa_fc_bias", False):
                params[f"blocks.{i}.layers.{j}.bias"] = (h,)
    if config.get("original_lm_head", False):
        params["lm_head.weight"] = (truncated, h)
    else:
        params.update({f"lm_heads.{i}.weight": (vocab, h) for i in range(n_heads)})
    return params


def vllm_param_name(key: str, config: dict) -> str | None:
    """Where vLLM 0.32.0's Medusa.load_weights puts a checkpoint key (None: token_map, not a parameter)."""
    name = key.replace("medusa_heads.", "")
    if name == "token_map":
        return None
    if config.get("original_lm_head", False) and name == "lm_heads.0.weight":
        return "lm_head.weight"
    return name


def check_vllm_tensors(config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every key maps onto a vLLM parameter of the right shape (after token_map slicing), every parameter
    is filled, and dtypes are what its loader can copy. Raises HeadsFormatError."""
    expected = expected_vllm_params(config)
    truncated = config.get("truncated_vocab_size")
    if truncated is not None and truncated < config["vocab_size"]:
        token_map = tensors.get("token_map")
        if token_map is None or token_map.dtype != torch.int64 or tuple(token_map.shape) != (truncated,):
            raise HeadsFormatError(f"truncated_vocab_size {truncated} needs an int64 token_map of {truncated} ids")
    seen = set()
    for key, tensor in tensors.items():
        name = vllm_param_name(key, config)
        if name is None:
            continue
        if name not in expected:
            raise HeadsFormatError(f"vLLM's Medusa has no parameter for key {key!r} (it would be dropped)")
        shape = tuple(tensor.shape)
        if "lm_head" in name and "token_map" in tensors and shape[0] > len(tensors["token_map"]):
            shape = (len(tensors["token_map"]), *shape[1:])  # load_weights slices the rows by token_map
        if shape != expected[name]:
            raise HeadsFormatError(f"key {key!r} has shape {list(shape)}, vLLM expects {list(expected[name])}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise HeadsFormatError(f"key {key!r} has dtype {tensor.dtype}, expected a float dtype")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise HeadsFormatError(f"vLLM's Medusa would have parameter {missing[0]!r} uninitialized")


def load_vllm_heads(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MedusaHeads, nn.Linear | None]:
    """Read an export back as nbkit heads: (heads, the copied lm_head for shared heads, else None)."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("model_type") != "medusa":
        raise HeadsFormatError(f"{folder / CONFIG_FILE} is not a vLLM Medusa config (model_type != 'medusa')")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    check_vllm_tensors(config, tensors)
    n_heads, n_layers, hidden = config["num_heads"], config["num_hidden_layers"], config["hidden_size"]
    shared = bool(config.get("original_lm_head", False))
    heads = MedusaHeads(hidden, n_heads, n_layers, None if shared else config["vocab_size"])
    state = {}
    for i in range(n_heads):
        for j in range(n_layers):
            for p in ("weight", "bias"):
                key = f"blocks.{i}.layers.{j}.{p}"
                state[f"{i}.{j}.linear.{p}"] = tensors[key] if key in tensors else torch.zeros(
                    heads.heads.state_dict()[f"{i}.{j}.linear.{p}"].shape)
        if not shared:
            state[f"{i}.{n_layers}.weight"] = tensors[f"lm_heads.{i}.weight"]
    heads.heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    heads.config = config
    lm_head = None
    if shared:
        weight = tensors["lm_heads.0.weight"]
        lm_head = nn.Linear(hidden, weight.shape[0], bias=False)
        lm_head.weight.data = weight.to(dtype)
        lm_head.requires_grad_(False)
        if "token_map" in tensors:
            heads.proposal_vocab = tensors["token_map"].to(torch.long)
    return heads.to(dtype).eval().requires_grad_(False), lm_head
