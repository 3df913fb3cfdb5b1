"""The memory arithmetic of a plan: what a llama-style model needs on a GPU, from its config.json's shapes.

Every figure here is checked against what the torch engine really allocates for vicuna-7b and vicuna-13b on
the `meta` device (tests/unit/test_plan_memory.py); env.choose_plan turns them into a plan for a card.
"""

from __future__ import annotations

GIB = 1024**3
MAX_BATCH = 16  # requests a server decodes together (load_engine's default)
VERIFY_TOKENS = 64  # the largest tree a step verifies per request (mc_sim_7b_63 + its root)
PREFILL_TOKENS = 256  # the engine's prefill budget: the longest prompt chunk of a step
# lmsys/vicuna-7b-v1.3's config.json: the sizes a plan uses when it is given none.
VICUNA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
             "vocab_size": 32000, "max_position_embeddings": 2048}


def sizes_from_shapes(cfg: dict, n_heads: int = 5, max_batch: int = MAX_BATCH) -> dict:
    """choose_plan() sizes of a llama-style model from its config.json's fields (KeyError if one is missing)."""
    h, layers, vocab, ffn = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    n_attn = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or h // n_attn
    kv_dim = head_dim * cfg.get("num_key_value_heads", n_attn)
    attn = 2 * h * h + 2 * h * kv_dim
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
    n_ctx = cfg.get("max_position_embeddings", 2048)
    return {
        "params_b": (layers * (attn + 3 * h * ffn + 2 * h) + embed + h) / 1e9,  # + the RMSNorm weights
        "heads_gib": n_heads * (h * h + h + h * vocab) * 2 / GIB,  # fp16, a ResBlock and an own lm_head each
        "kv_mib_per_token": 2 * layers * kv_dim * 2 / 2**20,
        "n_ctx": n_ctx,
        "workspace_gib": workspace_gib(h, ffn, vocab, n_ctx, max_batch),
    }


def workspace_gib(hidden: int, ffn: int, vocab: int, n_ctx: int, max_batch: int = MAX_BATCH) -> float:
    """The torch engine's widest pass, fp16: a verify of max_batch trees of VERIFY_TOKENS (all logits), or a
    prefill of max_batch chunks padded to PREFILL_TOKENS (last-token logits only)."""
    verify = _pass_bytes(max_batch * VERIFY_TOKENS, max_batch * VERIFY_TOKENS, hidden, ffn, vocab, n_ctx)
    prefill = _pass_bytes(max_batch * PREFILL_TOKENS, max_batch, hidden, ffn, vocab, n_ctx)
    return max(verify, prefill) / GIB


def _pass_bytes(rows: int, logit_rows: int, hidden: int, ffn: int, vocab: int, n_ctx: int) -> int:
    """What one forward pass holds at its peak (measured on the meta device, tests/unit/test_plan_memory.py):
    four hidden-wide fp16 tensors per row (residual, attention output, their sum, the normed input) and the
    float mask over the context (+ its boolean source) all along, then the larger of the MLP's three ffn-wide
    tensors and the lm_head's logits with their fp32 copy. SDPA's fused kernels hold no attention scores."""
    along = rows * (4 * hidden * 2 + (n_ctx + 1) * (2 + 1))
    return along + max(rows * ffn * 2 * 3, logit_rows * vocab * (2 + 4))


def kv_budget_gib(left_gib: float, kv_mib_per_token: float, n_ctx: int, max_batch: int = MAX_BATCH) -> float:
    """The KV budget: what is left, up to every slot's full context (+1 scratch position, as the torch runner
    allocates); more would never be used."""
    full = max_batch * (n_ctx + 1) * kv_mib_per_token / 1024
    return max(min(left_gib, full), 0.0)
