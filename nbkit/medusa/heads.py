"""Medusa heads and their checkpoint formats.

Head i (0-based) reads the base model's final-norm hidden state at position t and predicts the
token at t+2+i (the base lm_head predicts t+1). One head = ResBlock x n_layers, then either its own
Linear(H, V) (FasterDecoding format) or the base model's lm_head (shared format, TGI MedusaHeadV2).
The module layout mirrors upstream exactly so state-dict keys load strictly:
  `{i}.{j}.linear.weight|bias` for the ResBlocks, `{i}.{n_layers}.weight` for an own lm_head.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..models import embedded_heads_dir  # noqa: F401  (where the shipped heads are; callers import it here)

PT_FILE = "medusa_lm_head.pt"
SAFETENSORS_FILE = "medusa_lm_head.safetensors"
PROPOSAL_FILE = "proposal_vocab.json"  # optional: token ids the heads may propose (nbkit's own heads)


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)). The linear starts at zero, so an untrained head copies the base lm_head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """`n_heads` Medusa heads over hidden size H; `vocab_size` set means each head has its own lm_head."""

    def __init__(self, hidden_size: int, n_heads: int, n_layers: int = 1, vocab_size: int | None = None):
        super().__init__()
        self.hidden_size, self.n_heads, self.n_layers, self.vocab_size = hidden_size, n_heads, n_layers, vocab_size
        self.config: dict = {}  # config.json of a loaded checkpoint (measured acceptance, provenance)
        # Shared-format heads may propose only from a "proposal vocabulary" (the tokens the base model
        # actually produces): a slice of the lm_head's rows makes the heads several times cheaper per
        # step on a CPU. Proposals only: verification still scores the full vocabulary.
        self.proposal_vocab: torch.Tensor | None = None
        self._proposal_weight: tuple[nn.Module, tuple[torch.Tensor, nn.Module]] | None = None
        self.heads = nn.ModuleList()
        for _ in range(n_heads):
            layers: list[nn.Module] = [ResBlock(hidden_size) for _ in range(n_layers)]
            if vocab_size is not None:
                layers.append(nn.Linear(hidden_size, vocab_size, bias=False))
            self.heads.append(nn.Sequential(*layers))

    @property
    def shared_lm_head(self) -> bool:
        return self.vocab_size is None

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """hidden [N, H] -> logits [n_heads, N, V]. Shared-format heads need the base `lm_head`."""
        if self.shared_lm_head and lm_head is None:
            raise ValueError("these heads share the base model's lm_head: pass lm_head=")
        outs = []
        for head in self.heads:
            h = head(hidden)
            outs.append(lm_head(h) if self.shared_lm_head else h)
        return torch.stack(outs)

    @torch.inference_mode()
    def topk(self, hidden: torch.Tensor, lm_head: nn.Module | None, k: int) -> torch.Tensor:
        """hidden [N, H] -> candidate token ids [N, n_heads, k]."""
        if self.shared_lm_head:
            # One matmul with the (sliced) lm_head for all heads and rows.
            h = torch.stack([head(hidden) for head in self.heads], dim=1)  # [N, heads, H]
            if self.proposal_vocab is None:
                return lm_head(h).topk(k, dim=-1).indices
            vocab, head = self._proposal(lm_head)
            return vocab.to(h.device)[head(h).topk(k, dim=-1).indices]
        else:
            logits = self.forward(hidden).transpose(0, 1)
        return logits.topk(k, dim=-1).indices


    def _proposal(self, lm_head: nn.Module) -> tuple[torch.Tensor, nn.Module]:
        """(proposal ids, an lm_head over just those rows), built once per lm_head.

        An nn.Linear is sliced; another module may offer `sliced(ids)` (the int8 CPU lm_head does)."""
        if self._proposal_weight is None or self._proposal_weight[0] is not lm_head:
            n_vocab = getattr(lm_head, "out_features", None)
            vocab = self.proposal_vocab
            if n_vocab is not None and len(vocab) and int(vocab.max()) >= n_vocab:
                raise HeadsFormatError(f"proposal vocabulary holds token {int(vocab.max())}, but the base "
                                       f"model's vocabulary has {n_vocab} tokens")
            if hasattr(lm_head, "sliced"):
                head = lm_head.sliced(vocab)
            else:
                weight = lm_head.weight.detach()
                head = nn.Linear(weight.shape[1], len(vocab), bias=False, device=weight.device, dtype=weight.dtype)
                head.weight.data = weight[vocab.to(weight.device)].contiguous()
            self._proposal_weight = (lm_head, (vocab, head))
        vocab, head = self._proposal_weight[1]
        return vocab, head


class HeadsFormatError(ValueError):
    """A Medusa checkpoint whose keys or shapes do not match the expected layout."""


_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def infer_layout(state: dict[str, torch.Tensor]) -> tuple[int, int, bool]:
    """(n_heads, n_layers, own_lm_head) from upstream key names; unknown keys are an error."""
    heads: dict[int, set[tuple[int, str]]] = {}
    for key in state:
        m = _KEY.match(key)
        if not m:
            raise HeadsFormatError(f"unexpected key {key!r} in Medusa checkpoint")
        heads.setdefault(int(m[1]), set()).add((int(m[2]), m[3]))
    if not heads:
        raise HeadsFormatError("Medusa checkpoint holds no tensors")
    n_heads = max(heads) + 1
    if sorted(heads) != list(range(n_heads)):
        missing = sorted(set(range(n_heads)) - set(heads))
        raise HeadsFormatError(f"missing key {missing[0]}.0.linear.weight (heads must be numbered 0..{n_heads - 1})")
    sub = heads[0]
    n_layers = len([1 for j, name in sub if name == "linear.weight"])
    own = (n_layers, "weight") in sub
    return n_heads, n_layers, own


def heads_from_state_dict(
    state: dict[str, torch.Tensor], hidden_size: int, vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> MedusaHeads:
    """Build heads whose layout is read from the keys, then load strictly (clear error per key).

    The heads are built on the meta device and each checkpoint tensor is converted once, straight to
    `dtype` on `device`: FasterDecoding's vicuna-7b heads are 0.74 B parameters, so an fp32 copy on the way
    (then a cast to fp16) would need several GB more than serving them."""
    n_heads, n_layers, own = infer_layout(state)
    if own and vocab_size is None:
        vocab_size = state[f"0.{n_layers}.weight"].shape[0]
    with torch.device("meta"):
        heads = MedusaHeads(hidden_size, n_heads, n_layers, vocab_size if own else None)
    expected = heads.heads.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise HeadsFormatError(f"missing key {key!r} in Medusa checkpoint")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise HeadsFormatError(
                f"key {key!r} has shape {list(state[key].shape)}, expected {list(ref.shape)} "
                f"(hidden size {hidden_size}, vocab {vocab_size})"
            )
    for key in state:
        if key not in expected:
            raise HeadsFormatError(f"unexpected key {key!r} in Medusa checkpoint")
    converted = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}
    heads.heads.load_state_dict(converted, strict=True, assign=True)
    return heads


def _find_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (SAFETENSORS_FILE, PT_FILE):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {PT_FILE} in {path}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a Medusa checkpoint (.pt pickle with weights_only=True, or .safetensors), memory-mapped
    where the format allows: reading keys and shapes costs no RAM, and loading copies each tensor once."""
    file = _find_file(Path(path))
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a pre-1.6 (non-zip) pickle cannot be mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupted or truncated files raise many different types
        raise HeadsFormatError(f"cannot read Medusa checkpoint {file}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadsFormatError(f"{file} does not hold a dict of tensors")
    return dict(state)


def load_heads(
    path: str | Path, hidden_size: int, vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> MedusaHeads:
    """Load either published format. The head count comes from the weights, never from config.json
    (FasterDecoding/medusa-vicuna-7b-v1.3 says 2 heads and holds 5)."""
    heads = heads_from_state_dict(read_state_dict(path), hidden_size, vocab_size, dtype=dtype, device=device)
    config_file = (Path(path) if Path(path).is_dir() else Path(path).parent) / "config.json"
    heads.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    proposal_file = config_file.parent / PROPOSAL_FILE
    if heads.shared_lm_head and proposal_file.is_file():
        heads.proposal_vocab = read_proposal_vocab(proposal_file)
    return heads.eval().requires_grad_(False)


def read_proposal_vocab(path: Path) -> torch.Tensor:
    try:
        ids = json.loads(path.read_text())
    except ValueError as err:
        raise HeadsFormatError(f"cannot read {path}: {err}") from err
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise HeadsFormatError(f"{path} must hold a non-empty list of token ids")
    if len(ids) < 16:
        raise HeadsFormatError(f"{path} holds {len(ids)} token ids: too few to propose top-k candidates from")
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def save_heads(heads: MedusaHeads, out_dir: str | Path, proposal_vocab: list[int] | None = None,
               dtype: torch.dtype = torch.float32, **config) -> Path:
    """Save in the shared-lm_head (or own-lm_head) safetensors format with a small config.json
    (and, for shared-format heads, optionally the proposal vocabulary)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in heads.heads.state_dict().items()}
    save_file(state, str(out / SAFETENSORS_FILE))
    meta = {"medusa_num_heads": heads.n_heads, "medusa_num_layers": heads.n_layers,
            "hidden_size": heads.hidden_size, "shared_lm_head": heads.shared_lm_head, **config}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if proposal_vocab is not None:
        (out / PROPOSAL_FILE).write_text(json.dumps(sorted(set(proposal_vocab))) + "\n")
    return out
