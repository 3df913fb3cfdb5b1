"""The HTTP layer: turns HTTP requests into engine requests and streams the tokens back.

`create_app(engine, settings)` serves, over one engine:
- the project's original contract `POST /generate {"prompt", "max_tokens"} -> {"response"}`, and TGI's
  `POST /generate {"inputs", "parameters"}` and `POST /generate_stream` (SSE token events);
- OpenAI's `POST /v1/completions`, `POST /v1/chat/completions` (both also streamed) and `GET /v1/models`;
- `GET /health`, `GET /info`, `GET /metrics` (Prometheus) and a chat page at `GET /`.

Every refusal is a JSON error in the style of the route's API (errors.py): bad input is 4xx, a full
queue 429 with Retry-After, never a 500. Every accepted request ends with an answer or an error:
the engine finishes each request exactly once, and `Service.follow` also gives up on a dead engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import TemplateError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.request import EngineStopped, Finished, Overloaded, RequestHandle, SamplingParams, TokenEvent
from .errors import APIError, error_response
from .metrics import CONTENT_TYPE, CountRequests, Metrics
from .schemas import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    ModelCard,
    ModelList,
    OpenAIError,
    TGIDetails,
    TGIError,
    TGIGenerateResponse,
    TGIParameters,
    TGIToken,
    Usage,
)
from .security import BodyLimit, Guard
from .templates import chat_prompt_ids
from .timeouts import TimedEventSourceResponse

log = logging.getLogger("nbkit.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
TREE_RESERVE = 64 + 1  # the engine keeps room for its largest tree in the context
WATCH_EVERY = 0.25  # seconds between checks for a gone client or a dead engine while waiting for tokens
TGI_DEFAULT_MAX_NEW_TOKENS = 100
MIN_KEY_LENGTH = 16
OPENAI_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


@dataclass
class Settings:
    """Limits and security of one server. The key is never printed (repr=False), logged or served."""

    api_key: str | list[str] | None = field(default=None, repr=False)  # one key or several (each rate-limited)
    rate_limit: float | None = 600.0  # generation requests (POST) per minute per key; None = no limit
    max_input_tokens: int | None = None  # default: whatever the context leaves room for
    max_new_tokens: int = 2048  # the largest max_tokens a request may ask for (and the default for chat)
    max_stop: int = 4  # stop sequences per request (as OpenAI and TGI)
    max_stop_chars: int = 256  # characters per stop sequence: the engine matches them on every token
    max_body_bytes: int = 1 << 20
    retry_after: int = 1  # seconds, sent with 429 when the queue is full
    model_name: str | None = None  # the served model id (default: the engine's)
    engine_name: str = "torch"
    # Chat messages are text: "<|im_start|>system" in a message is not a special token (no forged turns).
    # True lets clients write raw special tokens into messages (trusted clients only).
    allow_special_tokens_in_chat: bool = False
    # One model is served: any model name a client sends gets it (as TGI and llama-server do; clients such
    # as huggingface_hub send "dummy"). True refuses other names with 404, as OpenAI does.
    strict_model_name: bool = False
    max_chat_messages: int = 1024  # messages per chat request, checked before the chat template runs
    # Slow clients (slow-loris, readers that never read): seconds to send the request head, the body, and
    # for each SSE event to be taken by the client; then 408 / the stream ends and its slot is freed.
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    limit_concurrency: int = 512  # connections + tasks; over it uvicorn answers 503 at once
    # Client-chosen trees ("tree": "mc_sim_7b_63" pads every row of the batch to 64 positions): an operator
    # opt-in. By default the adaptive policy decides; clients may still turn speculation off for themselves.
    allow_client_trees: bool = False

    @property
    def keys(self) -> list[str]:
        if not self.api_key:
            return []
        keys = [self.api_key] if isinstance(self.api_key, str) else list(self.api_key)
        if any(not isinstance(k, str) or not k.strip() for k in keys):
            raise ValueError("API keys must be non-empty strings")
        if any(len(k) < MIN_KEY_LENGTH for k in keys):
            raise ValueError(f"API keys must have at least {MIN_KEY_LENGTH} characters: a short key is guessed "
                             "quickly (make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        return keys


class Service:
    """What the routes share: the engine (None while it loads), settings, metrics, requests in flight."""

    def __init__(self, engine, settings: Settings, metrics: Metrics):
        self.engine = None
        self.settings, self.metrics = settings, metrics
        self.inflight: set[RequestHandle] = set()
        self.stopping = False
        self.created = int(time.time())
        if engine is not None:
            self.attach(engine)

    def attach(self, engine) -> None:
        """Serve `engine` (a started Engine); until then /health says "loading"."""
        self.metrics.attach(engine)
        self.engine = engine

    # ---- state ------------------------------------------------------------------------------
    @property
    def model_id(self) -> str | None:
        if self.settings.model_name:
            return self.settings.model_name
        return None if self.engine is None else str(self.engine.model_name)

    def status(self) -> tuple[str, str | None]:
        if self.stopping:
            return "stopping", "the server is stopping"
        if self.engine is None:
            return "loading", "the model is loading"
        if self.engine.dead:
            return "error", self.engine.dead
        if not self.engine.alive:
            return "error", "the engine is not running"
        return "ok", None

    def ready(self):
        status, why = self.status()
        if status != "ok":
            raise APIError(503, why, "unavailable", code=status, headers={"Retry-After": "5"})
        return self.engine

    def limits(self) -> tuple[int | None, int | None]:
        """(max_input_tokens, max_total_tokens) for the engine being served."""
        if self.engine is None:
            return None, None
        total = getattr(self.engine.runner, "max_context", 4096) - TREE_RESERVE
        max_input = total - 1
        if self.settings.max_input_tokens:
            max_input = min(max_input, self.settings.max_input_tokens)
        return max_input, total

    def check_model(self, name: str | None) -> None:
        self.ready()
        if self.settings.strict_model_name and name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.model_id!r}",
                           "not_found", param="model", code="model_not_found")

    # ---- requests -----------------------------------------------------------------------------
    async def encode(self, prompt: str) -> list[int]:
        """A raw prompt's ids: the client wrote the whole prompt, so special tokens in it are real (as in TGI)."""
        engine = self.ready()
        return await run_in_threadpool(engine.encode, prompt)

    def check_messages(self, messages: list[dict]) -> None:
        """Refuse chats that cannot fit before the template runs: it costs time per message and character.

        Every message adds at least one token and a token is rarely more than 16 characters, so more messages
        than input tokens, or 16 characters per input token, can never fit the context."""
        max_input, _ = self.limits()
        max_messages = min(self.settings.max_chat_messages, max_input or self.settings.max_chat_messages)
        if len(messages) > max_messages:
            raise APIError(None, f"{len(messages)} messages; at most {max_messages} are allowed", param="messages")
        chars = sum(len(m.get("content") or "") for m in messages)
        if max_input and chars > 16 * max_input:
            raise APIError(None, f"the messages have {chars} characters: far more than the {max_input} input "
                                 "tokens allowed", param="messages", code="context_length_exceeded")

    async def chat_ids(self, messages: list[dict]) -> list[int]:
        tokenizer = self.ready().tokenizer
        self.check_messages(messages)
        allow = self.settings.allow_special_tokens_in_chat
        try:
            return await run_in_threadpool(chat_prompt_ids, tokenizer, messages, allow)
        except (ValueError, TemplateError) as err:
            raise APIError(None, f"the chat template refused these messages: {err}", param="messages") from None

    def check_token_ids(self, ids: list[int]) -> None:
        tokenizer = self.ready().tokenizer
        try:
            n_vocab = len(tokenizer)
        except TypeError:
            n_vocab = tokenizer.vocab_size
        if any(not 0 <= i < n_vocab for i in ids):
            raise APIError(None, f"token ids must be in [0, {n_vocab})", param="prompt")

    def sampling(self, n_prompt: int, max_tokens: int | None, *, name: str = "max_tokens", stop=None,
                 **params) -> SamplingParams:
        """SamplingParams within this server's limits (max_tokens None = as many as allowed)."""
        self.ready()
        max_input, total = self.limits()
        s = self.settings
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if n_prompt == 0:
            raise APIError(None, "the prompt is empty", param="prompt")
        if n_prompt > max_input:
            raise APIError(None, f"the prompt has {n_prompt} tokens; at most {max_input} are allowed",
                           param="prompt", code="context_length_exceeded")
        room = total - n_prompt
        if max_tokens is None:
            max_tokens = min(s.max_new_tokens, room)
        elif max_tokens > s.max_new_tokens:
            raise APIError(None, f"{name} is {max_tokens}; at most {s.max_new_tokens} are allowed", param=name)
        elif max_tokens > room:
            raise APIError(None, f"the prompt ({n_prompt} tokens) plus {name} ({max_tokens}) exceed the context "
                                 f"limit of {total} tokens", param=name, code="context_length_exceeded")
        if len(stop) > s.max_stop:
            raise APIError(None, f"{len(stop)} stop sequences; at most {s.max_stop} are allowed", param="stop")
        if any(len(x) > s.max_stop_chars for x in stop):
            raise APIError(None, f"a stop sequence has {max(len(x) for x in stop)} characters; at most "
                                 f"{s.max_stop_chars} are allowed", param="stop")
        if params.get("speculate") is None:
            params["speculate"] = True
        if params.get("tree") not in (None, "none") and not s.allow_client_trees:
            raise APIError(None, "this server does not let clients choose the Medusa tree (the operator can allow "
                                 "it with allow_client_trees); leave 'tree' out, or send speculate: false",
                           param="tree", code="tree_not_allowed")
        return SamplingParams(max_tokens=max_tokens, stop=stop, **params)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (call from the event loop: the handle wakes this loop)."""
        engine = self.ready()
        try:
            handle = engine.submit(prompt_ids, params)
        except ValueError as err:
            raise APIError(None, str(err)) from None
        except Overloaded as err:
            raise APIError(429, str(err), "overloaded", code="overloaded",
                           headers={"Retry-After": str(self.settings.retry_after)}) from None
        except EngineStopped as err:
            raise APIError(503, str(err), "unavailable") from None
        self.inflight.add(handle)
        return handle

    async def follow(self, handle: RequestHandle, request: Request | None = None):
        """The request's events, ending with its Finished.

        Cancels the request when the client goes away: polled here when `request` is given (plain
        responses), by the cancellation of this generator for streams. Never waits forever on an
        engine that stopped without finishing the request.
        """
        events = handle.__aiter__()
        pending = None
        dead_ticks = 0
        next_check = time.monotonic() + WATCH_EVERY
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=WATCH_EVERY)
                if time.monotonic() >= next_check:  # also while tokens flow: a plain request sends nothing back
                    next_check = time.monotonic() + WATCH_EVERY
                    if request is not None and await request.is_disconnected():
                        handle.cancel()
                if not done:
                    engine = self.engine
                    dead_ticks = dead_ticks + 1 if engine is not None and not engine.alive else 0
                    if dead_ticks >= 2 and handle.finished is None:
                        fin = Finished("", [], "error", 0, 0, 0, None, 0.0,
                                       engine.dead or "the engine stopped", "generation")
                        self.metrics.observe_finished(fin)
                        yield fin
                        return
                    continue
                event = pending.result()
                pending = None
                if isinstance(event, Finished):
                    self.metrics.observe_finished(event)
                    yield event
                    return
                yield event
        finally:
            self.inflight.discard(handle)
            if pending is not None:
                pending.cancel()
            if handle.finished is None:
                handle.cancel()

    async def result(self, handle: RequestHandle, request: Request) -> Finished:
        fin = None
        async for event in self.follow(handle, request):
            fin = event
        return fin

    def failure(self, fin: Finished, openai: bool) -> APIError | None:
        """The error to answer for a request that did not complete (None if it did)."""
        if fin.finish_reason == "cancelled":
            return APIError(503, "the request was cancelled: the server is stopping", "unavailable")
        if fin.finish_reason == "error":
            if fin.error_type == "unavailable" or self.engine is None or not self.engine.alive:
                return APIError(503, fin.error or "the engine stopped", "unavailable")
            return APIError(500 if openai else 424, fin.error or "generation failed", "generation")
        return None

    def cancel_all(self) -> None:
        for handle in list(self.inflight):
            handle.cancel()


def create_app(engine=None, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app over `engine` (a started Engine, or None: attach it later with
    `app.state.service.attach(engine)`; /health answers 503 "loading" meanwhile)."""
    settings = settings or Settings()
    app = FastAPI(title="nbkit", version=__version__,
                  description="Medusa speculative decoding with continuous batching: the original /generate "
                              "contract, TGI and OpenAI-compatible APIs.")
    metrics = Metrics(routes=set())
    svc = Service(engine, settings, metrics)
    app.state.service = svc
    chat_page = CHAT_PAGE.read_text(encoding="utf-8")
    tgi_errors = {code: {"model": TGIError} for code in (401, 413, 422, 424, 429, 503)}
    openai_errors = {code: {"model": OpenAIError} for code in (400, 401, 404, 413, 429, 500, 503)}

    # ---- errors -----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        message, param = _describe(err.errors())
        return error_response(request.url.path, APIError(None, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 400:  # FastAPI could not decode the body (invalid UTF-8, ...): a validation error
            return error_response(request.url.path, APIError(None, f"the body is not valid JSON: {err.detail}"))
        kind = "not_found" if err.status_code == 404 else "validation"
        return error_response(request.url.path, APIError(err.status_code, str(err.detail), kind,
                                                         headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, APIError(500, "internal server error", "internal"))

    # ---- the original contract and TGI --------------------------------------------------------
    async def tgi_request(body: GenerateRequest):
        """(prompt ids, SamplingParams, TGI parameters or None for the original contract, prompt text)."""
        if body.inputs is not None and body.prompt is not None:
            raise APIError(None, "send either prompt (original API) or inputs (TGI API), not both", param="prompt")
        if body.inputs is None:
            if body.prompt is None:
                raise APIError(None, "prompt is required (or TGI's inputs)", param="prompt")
            if body.chat:
                ids = await svc.chat_ids([{"role": "user", "content": body.prompt}])
            else:
                ids = await svc.encode(body.prompt)
            params = svc.sampling(len(ids), body.max_tokens, stop=body.stop, temperature=body.temperature,
                                  top_p=body.top_p, top_k=body.top_k, seed=body.seed, speculate=body.speculate,
                                  tree=body.tree)
            return ids, params, None, body.prompt
        p = body.parameters or TGIParameters()
        ids = await svc.encode(body.inputs)
        temperature = p.temperature if p.temperature is not None else (1.0 if p.do_sample else 0.0)
        params = svc.sampling(len(ids), p.max_new_tokens or TGI_DEFAULT_MAX_NEW_TOKENS, name="max_new_tokens",
                              stop=p.stop, temperature=temperature, top_p=p.top_p or 1.0, top_k=p.top_k or 0,
                              seed=p.seed, speculate=p.speculate if p.speculate is not None else body.speculate,
                              tree=p.tree or body.tree)
        return ids, params, p, body.inputs

    @app.post("/generate", response_model=GenerateResponse | TGIGenerateResponse, responses=tgi_errors,
              tags=["original / TGI"])
    async def generate(body: GenerateRequest, request: Request):
        """Original contract `{"prompt", "max_tokens"}` -> `{"response", ...}`; TGI `{"inputs", "parameters"}`
        -> `{"generated_text", "details"}`."""
        if body.stream:
            raise APIError(None, "stream is not supported on /generate: use /generate_stream (or POST /)",
                           param="stream")
        ids, params, tgi, prompt = await tgi_request(body)
        fin = await svc.result(svc.submit(ids, params), request)
        if (err := svc.failure(fin, openai=False)) is not None:
            raise err
        if tgi is None:
            return GenerateResponse(response=fin.text, finish_reason=fin.finish_reason,
                                    prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                                    steps=fin.steps, mean_accepted=round(fin.mean_accepted, 4))
        details = None
        if tgi.details:
            tokenizer, eos = svc.engine.tokenizer, _eos_ids(svc.engine)
            details = TGIDetails(finish_reason=fin.finish_reason, generated_tokens=fin.completion_tokens,
                                 seed=tgi.seed, tokens=[TGIToken(id=t, text=tokenizer.decode([t]), special=t in eos)
                                                        for t in fin.token_ids])
        return TGIGenerateResponse(generated_text=(prompt if tgi.return_full_text else "") + fin.text,
                                   details=details)

    @app.post("/generate_stream", response_class=EventSourceResponse, responses=tgi_errors,
              tags=["original / TGI"])
    async def generate_stream(body: GenerateRequest):
        """TGI's token stream (SSE): one event per token; the last one carries `generated_text` and
        `details.finish_reason`. Errors after the stream started arrive as `{"error", "error_type"}`."""
        ids, params, tgi, prompt = await tgi_request(body)
        handle = svc.submit(ids, params)
        prefix = prompt if tgi is not None and tgi.return_full_text else ""
        seed = tgi.seed if tgi is not None else body.seed
        return TimedEventSourceResponse(_tgi_events(svc, handle, params.max_tokens, prefix, seed), headers=SSE_HEADERS,
                                       send_timeout=settings.send_timeout)

    # ---- OpenAI ---------------------------------------------------------------------------------
    def openai_sampling(body, n_prompt: int, max_tokens: int | None, name: str) -> SamplingParams:
        if body.n != 1:
            raise APIError(None, "n must be 1: one choice per request", param="n")
        for field_name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, field_name):
                raise APIError(None, f"{field_name} is not supported: leave it at 0", param=field_name)
        if body.logprobs:
            raise APIError(None, "logprobs are not supported", param="logprobs")
        return svc.sampling(n_prompt, max_tokens, name=name, stop=body.stop, temperature=body.temperature,
                            top_p=body.top_p, top_k=body.top_k, seed=body.seed, speculate=body.speculate,
                            tree=body.tree)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=openai_errors, tags=["OpenAI"])
    async def completions(body: CompletionRequest, request: Request):
        """Text completion (no chat template). `stream: true` answers SSE chunks, then `data: [DONE]`."""
        svc.check_model(body.model)
        if body.echo or body.suffix or (body.best_of or 1) != 1:
            raise APIError(None, "echo, suffix and best_of are not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            svc.check_token_ids(prompt)
            ids = list(prompt)
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(None, "send exactly one prompt per request", param="prompt")
                prompt = prompt[0]
            ids = await svc.encode(prompt)
        params = openai_sampling(body, len(ids), body.max_tokens, "max_tokens")
        handle = svc.submit(ids, params)
        rid, model = f"cmpl-{uuid.uuid4().hex}", svc.model_id
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return TimedEventSourceResponse(_openai_chunks(svc, handle, rid, model, chat=False, include_usage=usage),
                                       headers=SSE_HEADERS,
                                       send_timeout=settings.send_timeout)
        fin = await svc.result(handle, request)
        if (err := svc.failure(fin, openai=True)) is not None:
            raise err
        return CompletionResponse(id=rid, created=int(time.time()), model=model, usage=_usage(fin),
                                  choices=[CompletionChoice(text=fin.text,
                                                            finish_reason=OPENAI_FINISH[fin.finish_reason])])

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses=openai_errors, tags=["OpenAI"])
    async def chat_completions(body: ChatRequest, request: Request):
        """Chat with the model's chat template. `stream: true` answers SSE chunks, then `data: [DONE]`;
        `stream_options.include_usage` adds a last chunk with the token counts."""
        svc.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        ids = await svc.chat_ids(messages)
        if body.max_completion_tokens is not None:
            max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, name = body.max_tokens, "max_tokens"
        params = openai_sampling(body, len(ids), max_tokens, name)
        handle = svc.submit(ids, params)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", svc.model_id
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return TimedEventSourceResponse(_openai_chunks(svc, handle, rid, model, chat=True, include_usage=usage),
                                       headers=SSE_HEADERS,
                                       send_timeout=settings.send_timeout)
        fin = await svc.result(handle, request)
        if (err := svc.failure(fin, openai=True)) is not None:
            raise err
        choice = ChatChoice(message={"role": "assistant", "content": fin.text},
                            finish_reason=OPENAI_FINISH[fin.finish_reason])
        return ChatResponse(id=rid, created=int(time.time()), model=model, choices=[choice], usage=_usage(fin))

    @app.get("/v1/models", response_model=ModelList, responses=openai_errors, tags=["OpenAI"])
    async def models():
        svc.ready()
        return ModelList(data=[ModelCard(id=svc.model_id, created=svc.created)])

    # ---- operations -------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["operations"])
    async def health():
        """200 `{"status": "ok"}` when requests can be served; 503 while loading, stopping, or if the engine died.
        Open even when an API key is set; then it says no more than the status (no error text)."""
        status, why = svc.status()
        if status == "ok":
            return JSONResponse({"status": "ok"})
        if settings.keys:  # open to anyone on the public URL: the state, not the engine's error text
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": status, "error": why}, status_code=503)

    @app.get("/info", response_model=Info, tags=["operations"])
    async def info():
        """The model, engine and limits (TGI's /info fields where they exist)."""
        e = svc.engine
        max_input, total = svc.limits()
        heads = getattr(e, "heads", None)
        return Info(model_id=svc.model_id, engine=settings.engine_name, status=svc.status()[0],
                    heads=heads.n_heads if heads is not None else None,
                    speculation=e.policy.mode if e is not None and hasattr(e, "policy") else None,
                    max_concurrent_requests=getattr(e, "max_batch", None), max_queue=getattr(e, "max_queue", None),
                    max_input_tokens=max_input, max_total_tokens=total, max_new_tokens=settings.max_new_tokens,
                    max_stop_sequences=settings.max_stop, max_body_bytes=settings.max_body_bytes,
                    api_key_required=bool(settings.keys), rate_limit_per_minute=settings.rate_limit or None,
                    version=__version__)

    @app.get("/metrics", response_class=Response, tags=["operations"])
    async def prometheus_metrics():
        """Prometheus text format: requests by status, queue and batch size, tokens, latencies, speculation."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat():
        return HTMLResponse(chat_page)

    @app.post("/", responses=tgi_errors, tags=["original / TGI"])
    async def tgi_root(body: GenerateRequest, request: Request):
        """TGI's compatibility route (huggingface_hub's `InferenceClient(model=URL).text_generation` posts here):
        `stream: true` answers like `/generate_stream`, otherwise like `/generate`."""
        if body.stream:
            return await generate_stream(body)
        return await generate(body.model_copy(update={"stream": False}), request)

    metrics.routes.update(r.path for r in app.routes)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    settings.keys  # noqa: B018 -- refuse bad keys now, not on the first request
    app.add_middleware(Guard, keys=lambda: svc.settings.keys, rate_limit=settings.rate_limit)  # rotatable
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts the guards' refusals too
    return app


# ---- streams ------------------------------------------------------------------------------------

def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _tgi_events(svc: Service, handle: RequestHandle, max_tokens: int, prefix: str, seed):
    """TGI's stream: the final event is a token event that also carries generated_text and details.

    A token is held back only when it may be the last (EOS, max_tokens, or the request already
    finished), so that it can carry the final text; the others go out at once.
    """
    eos = _eos_ids(svc.engine)
    held: TokenEvent | None = None

    def token_event(e: TokenEvent, special: bool = False, fin: Finished | None = None) -> str:
        return _json({"index": e.index, "token": {"id": e.token_id, "text": e.text, "logprob": None,
                                                  "special": special or e.token_id in eos},
                      "generated_text": None if fin is None else prefix + fin.text,
                      "details": None if fin is None else {"finish_reason": fin.finish_reason,
                                                           "generated_tokens": fin.completion_tokens, "seed": seed}})

    async for event in svc.follow(handle):
        if isinstance(event, TokenEvent):
            if held is not None:
                yield token_event(held)
                held = None
            if handle.finished is not None or event.token_id in eos or event.index + 1 >= max_tokens:
                held = event
            else:
                yield token_event(event)
            continue
        fin = event
        if fin.finish_reason in ("error", "cancelled"):
            if held is not None:
                yield token_event(held)
            kind = "generation" if fin.finish_reason == "error" else "cancelled"
            yield _json({"error": fin.error or "the request was cancelled", "error_type": kind})
        elif held is not None:
            yield token_event(held, fin=fin)
        else:
            # The request ended (stop sequence) after its last token was sent: close with an empty special token.
            last = TokenEvent(fin.token_ids[-1] if fin.token_ids else 0, "", fin.completion_tokens)
            yield token_event(last, special=True, fin=fin)


async def _openai_chunks(svc: Service, handle: RequestHandle, rid: str, model: str, chat: bool,
                         include_usage: bool):
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if role else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return _json(out)

    if chat:
        yield chunk("", role=True)
    async for event in svc.follow(handle):
        if isinstance(event, TokenEvent):
            if event.text:
                yield chunk(event.text)
            continue
        fin = event
        if (err := svc.failure(fin, openai=True)) is not None:
            yield _json({"error": {"message": err.message, "type": "server_error", "param": None,
                                   "code": fin.finish_reason}})
        else:
            yield chunk(None, OPENAI_FINISH[fin.finish_reason])
            if include_usage:
                yield _json({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                             "usage": _usage(fin).model_dump(), "nbkit": _stats(fin)})
    yield "[DONE]"


# ---- small helpers --------------------------------------------------------------------------------

def _stats(fin: Finished) -> dict:
    """What the chat page and panel show under a reply: speed and tokens per decoding step."""
    return {"steps": fin.steps, "mean_accepted": round(fin.mean_accepted, 4),
            "tokens_per_s": round(fin.tokens_per_s, 2)}


def _usage(fin: Finished) -> Usage:
    return Usage(prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                 total_tokens=fin.prompt_tokens + fin.completion_tokens)


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _eos_ids(engine) -> set[int]:
    return set(getattr(engine, "eos_ids", ()) or ())


def _describe(errors) -> tuple[str, str | None]:
    """A readable message from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in list(errors)[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
            continue
        where = ".".join(loc)
        if not where and e.get("type") in ("model_attributes_type", "dict_type", "missing"):
            parts.append("the body must be a JSON object (Content-Type: application/json)")
            continue
        param = param or (e.get("ctx") or {}).get("param") or (loc[0] if loc else None)  # ctx: unsupported_parameter
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param
