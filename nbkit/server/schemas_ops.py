"""Bodies of the operations routes (/health, /info) and the tokenizer routes (/tokenize, /detokenize)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .schemas import Strict, Text

# ---- operations -----------------------------------------------------------------------------

class Health(BaseModel):
    status: str
    error: str | None = None


class SelfCheckRun(BaseModel):
    positions: int = Field(description="verified positions compared with plain decoding alone")
    max_abs_diff: float
    near_ties: int = Field(description="argmax flipped where plain decoding's top-2 margin is within the noise")
    disagreements: int = Field(description="argmax flipped where the margin is beyond the noise")
    passed: bool


class SelfCheckInfo(BaseModel):
    """The start-up check that decoding is lossless on the device that serves (nbkit/engine/selfcheck.py)."""

    passed: bool
    served: str = Field(description="the speculation mode served after the check")
    fallback: str | None = Field(description="what a failed check made the engine give up (None: nothing)")
    max_abs_diff: float = Field(description="largest |verified - plain| logit over every compared position")
    tolerance: float = Field(description="the noise allowed for this dtype (relative to the largest logit)")
    argmax_agrees: bool = Field(description="argmax equal wherever plain decoding's top-2 margin is beyond the noise")
    tokens_equal: bool = Field(description="every greedy token equal (near-ties included)")
    near_ties: int
    positions: int
    device: str
    dtype: str
    seconds: float
    runs: dict[str, SelfCheckRun] = Field(description="plain_batched, tree_alone, tree_batched (those that ran)")
    tree: str = Field("none", description="the tree verified (the one that serves), 'none' without speculation")
    cached: bool = Field(False, description="the verdict of an earlier identical check on this machine, model, "
                                            "engine, mode and nbkit code (not run again at this start)")
    pending: bool = Field(False, description="a first start: plain decoding is checked, the tree's runs come in idle "
                                             "time (no request uses a tree before they pass)")


class PrefixCacheInfo(BaseModel):
    enabled: bool = Field(description="false: started with --no-prefix-cache")
    cached_tokens: int = Field(description="prompt tokens reused rather than prefilled, since start")
    hits: int = Field(description="requests that reused a prefix")
    hit_rate: float = Field(description="cached / prompt tokens of the finished requests")
    evictions: int = Field(description="kept KV dropped for room (least recently used first)")
    retained_tokens: int = Field(description="finished requests' tokens whose KV is kept now")


class Info(BaseModel):
    model_id: str | None
    engine: str
    engine_reason: str | None = Field(None, description="why this engine serves: named, or the fastest for this "
                                                        "machine and model (nbkit/engine/choice.py)")
    status: str
    heads: int | None = Field(description="Medusa heads (None = no heads)")
    speculation: str | None
    mode: str | None = Field(None, description="llama.cpp engine: 'exact' (the default on a CPU) or 'fast'")
    guarantee: str | None = Field(None, description="what the llama.cpp mode promises for greedy output")
    mode_reason: str | None = Field(None, description="why the llama.cpp engine serves that mode")
    kv_cells: int | None = Field(None, description="llama.cpp engine: KV cells all requests share (they wait "
                                                   "for cells rather than fail)")
    max_concurrent_requests: int | None = Field(description="requests decoded together (slots)")
    max_queue: int | None
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_new_tokens: int
    max_stop_sequences: int
    max_body_bytes: int
    api_key_required: bool
    rate_limit_per_minute: float | None
    self_check: SelfCheckInfo | None = Field(None, description="the start-up self-check (None: not run)")
    calibration: str | None = Field(None, description="where the tree prices come from: 'measured' at this start, "
                                                      "'cached' from an earlier start on this machine, 'measuring' "
                                                      "(a first start measures in idle time while serving: plain "
                                                      "decoding until then), 'declared', or 'none' (no adaptive "
                                                      "speculation)")
    calibration_progress: float | None = Field(None, description="while 'measuring': the share measured (0-1)")
    prefix_cache: PrefixCacheInfo | None = Field(None, description="prefix reuse (None: no engine yet)")
    version: str


# ---- tokenizer: /tokenize, /detokenize (llama-server's shapes; vLLM's `prompt` too) ----------

class TokenizeRequest(Strict):
    content: Text | None = Field(None, description="llama-server: the text to tokenize")
    prompt: Text | None = Field(None, description="vLLM: the text to tokenize (same as content)")
    add_special: bool | None = Field(None, description="llama-server: add BOS as the tokenizer does (default false)")
    add_special_tokens: bool | None = Field(None, description="vLLM: the same (default true)")
    with_pieces: bool = Field(False, description="llama-server: tokens as {id, piece} objects")
    model: Text | None = None


class TokenPiece(BaseModel):
    id: int
    piece: str


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]
    count: int = Field(description="vLLM: the number of tokens")
    max_model_len: int | None = Field(None, description="vLLM: the context length (prompt and output)")


class DetokenizeRequest(Strict):
    tokens: list[int] = Field(description="token ids")
    model: Text | None = None


class DetokenizeResponse(BaseModel):
    content: str = Field(description="llama-server's field")
    prompt: str = Field(description="vLLM's field (the same text)")
