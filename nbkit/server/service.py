"""What the routes share: the served engine, the server's settings and limits, requests in flight.

Routes get the one Service of their app through `Depends(get_service)`. The Service talks to the
engine only through its public surface (submit, encode, tokenizer, limits(), alive, dead), never
its runner or policy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..chat_format import chat_prompt_ids
from ..engine.request import (
    EngineStopped,
    Finished,
    FinishReason,
    GrammarSpec,
    Overloaded,
    RequestHandle,
    SamplingParams,
)
from ..engine.stats_log import EngineLog
from .errors import APIError
from .logprobs import TokenLog
from .metrics import Metrics
from .request_log import log_request

WATCH_EVERY = 0.25  # seconds between checks for a gone client or a dead engine while waiting for tokens
MIN_KEY_LENGTH = 16


@dataclass
class Settings:
    """Limits and security of one server. The key is never printed (repr=False), logged or served."""

    api_key: str | list[str] | None = field(default=None, repr=False)  # one key or several (each rate-limited)
    rate_limit: float | None = 600.0  # generation requests (POST) per minute per key; None = no limit
    max_input_tokens: int | None = None  # default: whatever the context leaves room for
    max_new_tokens: int = 2048  # the largest max_tokens a request may ask for (and the default for chat)
    max_stop: int = 4  # stop sequences per request (as OpenAI and TGI)
    max_body_bytes: int = 1 << 20
    retry_after: int = 1  # seconds, sent with 429 when the queue is full
    model_name: str | None = None  # the served model id (default: the engine's)
    engine_name: str = "torch"
    engine_reason: str | None = None  # why that engine serves (engine/choice.py), shown by /info
    # Chat messages are text: "<|im_start|>system" in a message is not a special token (no forged turns).
    # True lets clients write raw special tokens into messages (trusted clients only).
    allow_special_tokens_in_chat: bool = False
    max_stop_chars: int = 256  # characters per stop sequence: the engine matches them on every token
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
    max_prompts: int = 16  # prompts in one /v1/completions request (each takes a slot in the batch)
    # Browsers may call the API from pages on these origins (CORS). "*" as llama-server and vLLM: the API is
    # authenticated by a key in a header, not by a cookie, so a foreign page cannot use a visitor's access.
    # [] = no CORS headers (browsers then allow only the server's own chat page).
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    log_interval: float = 10.0  # seconds between the engine's lines while it has work (stats_log); 0 = none

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
        self.inflight: dict[RequestHandle, str] = {}  # requests being answered -> their route (for the log)
        self.stopping = False
        self.created = int(time.time())
        if engine is not None:
            self.attach(engine)

    def attach(self, engine) -> None:
        """Serve `engine` (a started Engine); until then /health says "loading"."""
        self.metrics.attach(engine)
        if self.settings.log_interval > 0:
            EngineLog(engine, self.settings.log_interval).attach()
        self.engine = engine

    # ---- state ------------------------------------------------------------------------------
    @property
    def model_id(self) -> str | None:
        if self.settings.model_name:
            return self.settings.model_name
        return None if self.engine is None else str(self.engine.model_name)

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: what served the answer (nbkit version and engine), so that a client
        comparing answers sees when the backend changed."""
        return f"fp_nbkit-{__version__}-{self.settings.engine_name}"

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
        total = self.engine.limits().max_total_tokens
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
                                 f"tokens allowed (this model's maximum context length is {self.limits()[1]} "
                                 "tokens)", param="messages", code="context_length_exceeded")

    async def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt ids of a chat; `tools` (function definitions) as chat_format.chat_prompt_ids shows them."""
        tokenizer = self.ready().tokenizer
        self.check_messages(messages)
        allow = self.settings.allow_special_tokens_in_chat
        try:
            return await run_in_threadpool(chat_prompt_ids, tokenizer, messages, allow, tools)
        except (ValueError, TemplateError) as err:
            raise APIError(None, f"the chat template refused these messages: {err}", param="messages") from None

    def check_token_ids(self, ids: list[int], param: str = "prompt") -> None:
        tokenizer = self.ready().tokenizer
        try:
            n_vocab = len(tokenizer)
        except TypeError:
            n_vocab = tokenizer.vocab_size
        if any(not 0 <= i < n_vocab for i in ids):
            raise APIError(None, f"token ids must be in [0, {n_vocab})", param=param)

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
            raise APIError(None, f"the prompt has {n_prompt} tokens; at most {max_input} input tokens are allowed "
                                 f"(this model's maximum context length is {total} tokens)",
                           param="prompt", code="context_length_exceeded")
        room = total - n_prompt
        if max_tokens is None:
            max_tokens = min(s.max_new_tokens, room)
        elif max_tokens > s.max_new_tokens:
            raise APIError(None, f"{name} is {max_tokens}; at most {s.max_new_tokens} are allowed", param=name)
        elif max_tokens > room:
            raise APIError(None, f"the prompt ({n_prompt} tokens) plus {name} ({max_tokens}) exceed this model's "
                                 f"maximum context length of {total} tokens", param=name,
                           code="context_length_exceeded")
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

    async def compile_grammar(self, spec: GrammarSpec | None, param: str) -> GrammarSpec | None:
        """`spec` once the engine has compiled it: in a worker thread, as a large schema takes seconds (the
        engine caches it); a bad schema or regex answers 400 naming the problem."""
        if spec is not None:
            try:
                await asyncio.to_thread(self.ready().compile_grammar, spec)
            except ValueError as err:
                raise APIError(400, str(err), param=param, code="invalid_grammar") from None
        return spec

    def submit(self, prompt_ids: list[int], params: SamplingParams, route: str) -> RequestHandle:
        """Queue a request answered on `route` (call from the event loop: the handle wakes this loop)."""
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
        self.inflight[handle] = route
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
                        fin = Finished("", [], FinishReason.ERROR, 0, 0, 0, None, 0.0,
                                       engine.dead or "the engine stopped", "generation")
                        self.finished(handle, fin)
                        yield fin
                        return
                    continue
                event = pending.result()
                pending = None
                if isinstance(event, Finished):
                    self.finished(handle, event)
                    yield event
                    return
                yield event
        finally:
            self.inflight.pop(handle, None)
            if pending is not None:
                pending.cancel()
            if handle.finished is None:
                handle.cancel()

    def finished(self, handle: RequestHandle, fin: Finished) -> None:
        """Count the request's end in the metrics and write its log line."""
        self.metrics.observe_finished(fin)
        log_request(self.inflight.get(handle, "unknown"), fin)

    async def result(self, handle: RequestHandle, request: Request) -> Finished:
        fin = None
        async for event in self.follow(handle, request):
            fin = event
        return fin

    def failure(self, fin: Finished, openai: bool) -> APIError | None:
        """The error to answer for a request that did not complete (None if it did)."""
        if fin.finish_reason is FinishReason.CANCELLED:
            return APIError(503, "the request was cancelled: the server is stopping", "unavailable")
        if fin.finish_reason is FinishReason.ERROR:
            if fin.error_type == "unavailable" or self.engine is None or not self.engine.alive:
                return APIError(503, fin.error or "the engine stopped", "unavailable")
            return APIError(500 if openai else 424, fin.error or "generation failed", "generation")
        return None

    def token_log(self) -> TokenLog:
        """A choice's token texts and log-probabilities in the APIs' shapes (logprobs.py)."""
        return TokenLog(self.engine.tokenizer, self.engine.eos_ids)

    def cancel_all(self) -> None:
        for handle in list(self.inflight):
            handle.cancel()


def get_service(request: Request) -> Service:
    """The app's Service (a FastAPI dependency)."""
    return request.app.state.service
