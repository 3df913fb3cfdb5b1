"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (both also streamed), `/v1/models`."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request

from ...engine.request import GrammarSpec, RequestHandle, SamplingParams
from ..errors import APIError
from ..grammar import openai_grammar
from ..schemas import (
    SEED_MAX,
    ChatChoice,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIError,
)
from ..service import Service, get_service
from ..streams import SSE_HEADERS, STREAMED, openai_chunks, usage
from ..timeouts import TimedEventSourceResponse
from ..tools import ToolPlan, answer, tool_plan

router = APIRouter(tags=["OpenAI"],  # included at /v1 and at the root
                   responses={code: {"model": OpenAIError} for code in (400, 401, 404, 413, 429, 500, 503)})


def openai_sampling(svc: Service, body, n_prompt: int, max_tokens: int | None, name: str,
                    choice: int = 0) -> SamplingParams:
    """Choice `choice` of the body's n: a seeded request gives it seed + choice (each choice reproducible)."""
    for field_name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field_name):
            raise APIError(None, f"{field_name} is not supported: leave it at 0", param=field_name)
    logprobs, top_logprobs = requested_logprobs(body)
    return svc.sampling(n_prompt, max_tokens, name=name, stop=body.stop, temperature=body.temperature,
                        top_p=body.top_p, top_k=body.top_k, speculate=body.speculate, tree=body.tree,
                        seed=None if body.seed is None else (body.seed + choice) % (SEED_MAX + 1),
                        logprobs=logprobs, top_logprobs=top_logprobs)


def requested_logprobs(body) -> tuple[bool, int]:
    """(logprobs, top_logprobs): chat's `logprobs` and `top_logprobs`, or completions' `logprobs` (how many)."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(None, "top_logprobs needs logprobs: true", param="top_logprobs")
        return body.logprobs, body.top_logprobs or 0
    return body.logprobs is not None, body.logprobs or 0


def choices(svc: Service, body, prompts: list[list[int]], max_tokens: int | None, name: str,
            grammar: GrammarSpec | None) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each prompt body.n times in a row (its choices decode side by side; the engine prefills the prompt once)."""
    cap = svc.settings.max_prompts
    if not 1 <= body.n * len(prompts) <= cap:
        raise APIError(None, f"n={body.n} choices of {len(prompts)} prompt(s); at most {cap} choices in all",
                       param="n")
    params = [openai_sampling(svc, body, len(ids), max_tokens, name, i) for ids in prompts for i in range(body.n)]
    for p in params:
        p.grammar = grammar
    return [ids for ids in prompts for _ in range(body.n)], params


async def chat_grammar(svc: Service, body: ChatRequest, plan: ToolPlan | None) -> GrammarSpec | None:
    """The compiled grammar of a chat: a forced tool call's arguments schema, or `response_format`'s."""
    fmt = openai_grammar(body.response_format)
    if plan is not None and plan.grammar is not None:
        if fmt is not None:
            raise APIError(None, "response_format and a required tool call both constrain the answer: send one",
                           param="response_format")
        return await svc.compile_grammar(plan.grammar, "tools")
    return await svc.compile_grammar(fmt, "response_format")


async def completion_prompts(svc: Service, prompt) -> list[list[int]]:
    """A completion's prompts: one text or token-id list, or a list of them (one choice each)."""
    if isinstance(prompt, str):
        return [await svc.encode(prompt)]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    if not 1 <= len(prompt) <= svc.settings.max_prompts:
        raise APIError(None, f"{len(prompt)} prompts; send 1 to {svc.settings.max_prompts}", param="prompt")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(await svc.encode(p))
        else:
            svc.check_token_ids(p)
            prompts.append(list(p))
    return prompts


def submit_all(svc: Service, prompts: list[list[int]], params: list[SamplingParams],
               route: str) -> list[RequestHandle]:
    """Queue every prompt (they decode side by side in the batch); none stays queued if one is refused."""
    handles: list[RequestHandle] = []
    try:
        for ids, p in zip(prompts, params, strict=True):
            handles.append(svc.submit(ids, p, route))
    except APIError:
        for h in handles:
            h.cancel()
            svc.inflight.pop(h, None)
        raise
    return handles


async def run(svc: Service, body, request: Request, prompts: list[list[int]], params: list[SamplingParams],
              rid: str, chat: bool, tools: ToolPlan | None = None):
    """Submit; then either the SSE response (`stream: true`) or the finished requests, failures raised as 4xx/5xx."""
    handles = submit_all(svc, prompts, params, request.url.path)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = openai_chunks(svc, handles, rid, svc.model_id, chat=chat, include_usage=include_usage,
                               logprobs=params[0].logprobs, tools=tools, n=body.n)
        return TimedEventSourceResponse(chunks, headers=SSE_HEADERS, send_timeout=svc.settings.send_timeout)
    fins = await asyncio.gather(*(svc.result(h, request) for h in handles))
    for fin in fins:
        if (err := svc.failure(fin, openai=True)) is not None:
            raise err
    return fins


@router.post("/completions", response_model=CompletionResponse, responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, svc: Service = Depends(get_service)):
    """Text completion (no chat template). `prompt` may be a list: one choice per prompt (`index` says which).
    `stream: true` answers SSE chunks, then `data: [DONE]`."""
    svc.check_model(body.model)
    if body.echo or body.suffix or (body.best_of or 1) != 1:
        raise APIError(None, "echo, suffix and best_of are not supported", param="echo")
    grammar = await svc.compile_grammar(openai_grammar(body.response_format), "response_format")
    prompts, params = choices(svc, body, await completion_prompts(svc, body.prompt), body.max_tokens, "max_tokens",
                              grammar)
    rid, model = f"cmpl-{uuid.uuid4().hex}", svc.model_id
    fins = await run(svc, body, request, prompts, params, rid, chat=False)
    if isinstance(fins, TimedEventSourceResponse):
        return fins
    out = [CompletionChoice(index=i, text=fin.text, finish_reason=fin.finish_reason.openai,
                            logprobs=svc.token_log().openai_completion(fin.logprobs) if p.logprobs else None)
           for i, (fin, p) in enumerate(zip(fins, params))]
    return CompletionResponse(id=rid, created=int(time.time()), model=model, system_fingerprint=svc.fingerprint,
                              usage=usage(fins, body.n), choices=out)


@router.post("/chat/completions", response_model=ChatResponse, responses=STREAMED)
async def chat_completions(body: ChatRequest, request: Request, svc: Service = Depends(get_service)):
    """Chat with the model's chat template. `stream: true` answers SSE chunks, then `data: [DONE]`;
    `stream_options.include_usage` adds a last chunk with the token counts. With `tools` the model may call
    functions (`tool_choice` "required" or a named function: it must, with schema-constrained arguments)."""
    svc.check_model(body.model)
    plan = tool_plan(body)
    ids = await svc.chat_ids([_message(m) for m in body.messages],
                             tools=list(plan.functions.values()) if plan is not None else None)
    if body.max_completion_tokens is not None:
        max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, name = body.max_tokens, "max_tokens"
    prompts, params = choices(svc, body, [ids], max_tokens, name, await chat_grammar(svc, body, plan))
    rid, model = f"chatcmpl-{uuid.uuid4().hex}", svc.model_id
    fins = await run(svc, body, request, prompts, params, rid, chat=True, tools=plan)
    if isinstance(fins, TimedEventSourceResponse):
        return fins
    out = []
    for i, (fin, p) in enumerate(zip(fins, params)):
        content, tool_calls, finish_reason = answer(plan, fin.text, fin.finish_reason.openai)
        out.append(ChatChoice(index=i, message={"role": "assistant", "content": content, "tool_calls": tool_calls},
                              finish_reason=finish_reason,
                              logprobs=svc.token_log().openai_chat(fin.logprobs) if p.logprobs else None))
    return ChatResponse(id=rid, created=int(time.time()), model=model, system_fingerprint=svc.fingerprint,
                        choices=out, usage=usage(fins, body.n))


@router.get("/models", response_model=ModelList)
async def models(svc: Service = Depends(get_service)):
    svc.ready()
    return ModelList(data=[ModelCard(id=svc.model_id, created=svc.created)])


def _message(m) -> dict:
    """A message as chat_format takes it: text content; an assistant's calls and a tool result's call id."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)
