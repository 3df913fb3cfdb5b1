"""What the llama.cpp runner allocates and which numerics mode it serves, decided before any context exists.

- `choose_mode`: exact or fast, and the K/V cache types, from the device, the model's head size and the
  caller's wishes, with the reason in words (the server's /info shows it);
- `context_cells`: the KV cells of the one unified cache all slots share: every slot at the model's full
  context, or as many as the plan's KV budget holds;
- `runner_bytes`: what a runner allocates for a model of a given shape (weights by GGUF tensor type, KV
  cache, a dense lm_head, output buffers), from the config alone: the plan (nbkit/notebook/env.py) is
  checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per value of the cache and weight types (block types: bytes per block / values per block).
TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k": 144 / 256, "q6_k": 210 / 256}
Q8_BLOCK = 32  # values per q8_0 block: a q8_0 cache row must be a whole number of blocks
CELL_ALIGN = 256  # llama.cpp pads n_ctx up to a multiple of 256: budgets are rounded down to it


@dataclass(frozen=True)
class Mode:
    exact: bool
    k_type: str
    v_type: str
    reason: str


def choose_mode(exact: bool | None, on_cpu: bool, head_dim: int, kv_type: str, v_type: str | None,
                flash_attn: bool | None) -> Mode:
    """exact None = auto: exact on the CPU (its guarantee is an analysis of ggml-cpu's kernels), fast with GPU
    offload (ubatch caps and padding are CPU-kernel specific; the start-up self-check checks this device).
    Exact mode on the CPU prefers a q8_0 V cache (K and V of different types: the plain kernel, full
    ubatches), which needs a head size that is a multiple of 32; otherwise it keeps f16 V and pads."""
    types = ("f16", "f32", "bf16", "q8_0")
    if kv_type not in types or (v_type is not None and v_type not in types):
        raise ValueError(f"kv_type and v_type must be one of {types}")
    if exact is None:
        exact = on_cpu
        reason = ("auto: the CPU backend, whose kernels exact mode was shown for" if on_cpu else
                  "auto: GPU offload; exact mode's ubatch caps and padding are specific to ggml's CPU kernels "
                  "(the start-up self-check compares tree and plain logits on this device)")
    else:
        reason = "set by the caller"
    if exact and flash_attn is False:
        raise ValueError("the exact configuration needs flash attention (the only placement-invariant path)")
    if v_type is None:
        q8_fits = head_dim % Q8_BLOCK == 0
        v_type = "q8_0" if exact and on_cpu and kv_type != "q8_0" and q8_fits else kv_type
        if exact and on_cpu and not q8_fits:
            reason += (f"; an f16 V cache with 63-token ubatches and padded single tokens: head size {head_dim} "
                       f"is not a multiple of q8_0's {Q8_BLOCK}-value blocks")
    if "q8_0" in (kv_type, v_type) and flash_attn is False:
        raise ValueError("a q8_0 KV cache needs flash attention")
    return Mode(exact, kv_type, v_type, reason)


def kv_bytes_per_cell(n_layer: int, kv_dim: int, k_type: str, v_type: str) -> float:
    """One KV cell: a K and a V row of kv_dim values in every layer."""
    return n_layer * kv_dim * (TYPE_BYTES[k_type] + TYPE_BYTES[v_type])


def context_cells(max_slots: int, n_ctx_train: int, bytes_per_cell: float, kv_budget_bytes: int | None) -> int:
    """Cells of the unified cache: every slot at the model's full context, capped by the plan's budget (rounded
    down to llama.cpp's 256-cell padding); without a budget (a CPU), by today's default of
    max(4096, 256 x slots) cells."""
    want = max_slots * n_ctx_train
    if kv_budget_bytes is None:
        return min(want, max(4096, CELL_ALIGN * max_slots))
    cells = int(kv_budget_bytes // bytes_per_cell) // CELL_ALIGN * CELL_ALIGN
    if cells < CELL_ALIGN:
        raise ValueError(f"a KV budget of {kv_budget_bytes / 2**20:.1f} MiB holds fewer than {CELL_ALIGN} cells "
                         f"of {bytes_per_cell / 2**10:.1f} KiB")
    return min(want, cells)


@dataclass(frozen=True)
class ModelShape:
    """A llama-architecture model's sizes (config.json's names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})

    @property
    def kv_dim(self) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        return head_dim * (self.num_key_value_heads or self.num_attention_heads)


def _more_bits(i: int, n: int) -> bool:
    """llama-quantize's Q4_K_M rule for the layers whose attn_v and ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def weight_bytes(shape: ModelShape, quant: str) -> float:
    """The GGUF's weights by tensor type: every matrix in `quant` (f16, q8_0; q4_k_m: Q4_K, with Q6_K for the
    output and for attn_v / ffn_down in llama-quantize's chosen layers), norms in f32."""
    h, kv, ffn, n = shape.hidden_size, shape.kv_dim, shape.intermediate_size, shape.num_hidden_layers
    base = {"q4_k_m": "q4_k"}.get(quant, quant)
    more = "q6_k" if quant == "q4_k_m" else base
    total = shape.vocab_size * h * TYPE_BYTES[base]  # token_embd
    if not shape.tie_word_embeddings:
        total += shape.vocab_size * h * TYPE_BYTES[more]  # output
    for i in range(n):
        v_down = more if quant == "q4_k_m" and _more_bits(i, n) else base
        total += (2 * h * h + h * kv + ffn * h * 2) * TYPE_BYTES[base]  # q, o, k, gate, up
        total += (h * kv + h * ffn) * TYPE_BYTES[v_down]  # v, down
        total += 2 * h * 4  # the two norms
    return total + h * 4


def runner_bytes(shape: ModelShape, quant: str, kv_cells: int, k_type: str = "f16", v_type: str = "f16",
                 n_batch: int = 1024, dense_lm_head_bytes: float = 0.0) -> dict[str, float]:
    """What a LlamaCppRunner allocates, by part: the weights, the KV cache, llama.cpp's output buffers (logits
    and hidden states of every token of a full batch, fp32) and a dense lm_head (shared-lm_head heads only:
    2 bytes a value on a GPU)."""
    return {
        "weights": weight_bytes(shape, quant),
        "kv": kv_cells * kv_bytes_per_cell(shape.num_hidden_layers, shape.kv_dim, k_type, v_type),
        "outputs": (n_batch + 1) * (shape.vocab_size + shape.hidden_size) * 4.0,
        "lm_head": shape.vocab_size * shape.hidden_size * dense_lm_head_bytes,
    }
