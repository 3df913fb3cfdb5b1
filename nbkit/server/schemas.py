"""Request and response bodies. Typed so that the OpenAPI schema (/docs) is the documentation.

Requests are strict: "50" is not an int and 1.5 is not a max_tokens. Fields we do not implement, known
(`tools`, `logit_bias`, `response_format`, `grammar`, `repetition_penalty`, ...) or not, are refused with
an error naming them when set to anything but a neutral value (null, false, 0, "", {}, [], or the field's
own default such as `repetition_penalty: 1`), so nobody gets a silently different answer; clients that
send every optional field with its default (huggingface_hub does) are served.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

SEED_MAX = 2**63 - 1


def _unicode_text(value: str) -> str:
    # JSON can escape lone surrogates ("\ud800") that no tokenizer and no UTF-8 encoder accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogate escapes \\ud800-\\udfff)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]  # every string a client sends


# Unsupported fields whose neutral value is not null/false/0/empty: the value that changes nothing.
NEUTRAL = {
    "repetition_penalty": (1, 1.0), "typical_p": (1, 1.0), "best_of": (1,), "n": (1,), "top_logprobs": (0,),
    "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True,),
    "service_tier": ("auto", "default"), "modalities": (["text"],),
}
# Informational fields that change no output: accepted whatever their value.
INFORMATIONAL = frozenset({"metadata", "store", "user", "service_tier", "prompt_cache_key", "safety_identifier",
                           "refusal", "annotations", "audio", "tool_calls", "tool_call_id", "function_call"})


def _neutral(name: str, value) -> bool:
    if value is None or value is False or (type(value) in (int, float) and value == 0):
        return True
    if value in ("", {}, []) or name in INFORMATIONAL:
        return True
    return any(type(value) is type(n) and value == n for n in NEUTRAL.get(name, ()))


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if not _neutral(name, value):
                raise PydanticCustomError("unsupported_parameter", "the parameter '{param}' is not supported by "
                                          "this server: leave it out (or at its neutral value)", {"param": name})
        return self


class SpeculationOptions(Strict):
    """nbkit extensions, accepted by every generation route (OpenAI clients pass them in `extra_body`)."""

    speculate: bool | None = Field(None, description="false = plain decoding for this request (Medusa off)")
    tree: Text | None = Field(None, description="force a tree: 'none', 'chain-K', 'mc_sim_7b_63', ...")


# ---- the original contract and TGI: POST /generate, POST /generate_stream --------------------

class TGIParameters(Strict):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: list[Text] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    do_sample: bool = False
    details: bool = False
    return_full_text: bool = False
    speculate: bool | None = None
    tree: Text | None = None


class GenerateRequest(SpeculationOptions):
    """Either the original `{"prompt", "max_tokens"}` or TGI's `{"inputs", "parameters"}`."""

    prompt: Text | None = Field(None, description="original contract: the prompt (raw text, no chat template)")
    max_tokens: int = Field(50, ge=1, description="original contract: tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: list[Text] = Field(default_factory=list)
    chat: bool = Field(False, description="apply the model's chat template to the prompt")
    inputs: Text | None = Field(None, description="TGI: the prompt")
    parameters: TGIParameters | None = Field(None, description="TGI: generation parameters")
    stream: bool = Field(False, description="TGI's POST /: true answers like /generate_stream")


class GenerateResponse(BaseModel):
    """The original contract's answer: `response`; the other fields were added later."""

    response: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    steps: int = Field(description="decoding steps (tree verifications)")
    mean_accepted: float = Field(description="tokens per decoding step; 1.0 = no speculative gain")


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class TGIDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[TGIToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)


class TGIGenerateResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIError(BaseModel):
    error: str
    error_type: str


# ---- OpenAI: /v1/completions, /v1/chat/completions, /v1/models -------------------------------

class StreamOptions(Strict):
    include_usage: bool = False


class OpenAIRequest(SpeculationOptions):
    model: Text | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM); 0 = off")
    n: int = Field(1, description="choices per prompt, decoded side by side (the prompt prefilled once); a seeded "
                                  "request gives choice i the seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    presence_penalty: float = Field(0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, description="not supported: must be 0")
    user: Text | None = None


class CompletionRequest(OpenAIRequest):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="text or token ids; a list of texts or of token-id lists gives one choice per prompt")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="not supported: must be false")
    logprobs: int | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")
    suffix: Text | None = Field(None, description="not supported")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; same as max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="not supported")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV was reused (prefix cache), not prefilled")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="each prompt counted once, whatever n")
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nbkit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


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
