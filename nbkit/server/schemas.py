"""Request and response bodies. Typed so that the OpenAPI schema (/docs) is the documentation.

Requests are strict: "50" is not an int and 1.5 is not a max_tokens. Fields we do not implement, known
(`logit_bias`, `repetition_penalty`, ...) or not, are refused with
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
    "repetition_penalty": (1, 1.0), "typical_p": (1, 1.0), "best_of": (1,), "n": (1,),
    "tool_choice": ("none", "auto"), "parallel_tool_calls": (True,),
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


# ---- structured output (server/grammar.py turns these into the engine's GrammarSpec) ----------

JSONSchema = dict | bool | Text  # a schema object (or its JSON text)


class TGIGrammar(Strict):
    type: Literal["json", "regex"] = Field(description="json: value is a JSON schema; regex: a pattern")
    value: JSONSchema


class JSONSchemaFormat(Strict):
    name: Text | None = None
    description: Text | None = None
    schema_: dict | bool | None = Field(None, alias="schema", description="the JSON schema the answer follows")
    strict: bool | None = Field(None, description="always enforced: unsupported schema keywords answer 400")


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


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
    top_n_tokens: int | None = Field(None, ge=0, le=20, description="the most likely tokens at each position "
                                     "(details.top_tokens; a stream event's top_tokens)")
    decoder_input_details: bool = Field(False, description="not supported: the prompt's log-probabilities")
    grammar: TGIGrammar | None = Field(None, description="constrain the output to a JSON schema or a regex")
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
    json_schema: JSONSchema | None = Field(None, description="original contract: the answer follows this JSON schema")
    regex: Text | None = Field(None, description="original contract: the answer matches this regular expression")
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
    top_tokens: list[list[TGIToken]] | None = Field(None, description="with top_n_tokens: per token, most likely first")


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
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: JSON output")


class CompletionRequest(OpenAIRequest):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="text or token ids; a list of texts or of token-id lists gives one choice per prompt")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="not supported: must be false")
    logprobs: int | None = Field(None, ge=0, le=20, description="each token's log-probability and this many most "
                                 "likely tokens' (after temperature, top-k and top-p; temperature 0: the model's own)")
    best_of: int | None = Field(None, description="only 1 is supported")
    suffix: Text | None = Field(None, description="not supported")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(Strict):
    name: Text
    arguments: Text = Field(description="the arguments as JSON text")


class ToolCall(Strict):
    """A call the assistant made (in answers, and in the history clients send back)."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments (an object)")
    strict: bool | None = Field(None, description="accepted: arguments are always schema-constrained when a "
                                                  "call is forced (tool_choice required or named)")


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: Text


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: Text | None = Field(None, description="tool: the call this message answers")


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; same as max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each token's log-probability (after temperature, top-k, top-p; "
                           "temperature 0: the model's own distribution)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many most likely tokens' (with logprobs)")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: 'auto' with tools, 'none' without")
    parallel_tool_calls: bool = Field(True, description="allow several calls in one answer")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV was reused (prefix cache), not prefilled")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="each prompt counted once, whatever n")
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
