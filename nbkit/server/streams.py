"""Server-sent event streams: TGI's token events and OpenAI's chunks, from one request's engine events."""

from __future__ import annotations

import json
import time

from ..engine.request import Finished, FinishReason, RequestHandle, TokenEvent
from .schemas import Usage
from .service import Service

# OpenAPI: routes that answer JSON, or SSE events when the body says `stream: true`.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "required": ["data"]}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                  "description": "JSON, or with `stream: true` Server-Sent Events (`data: {...}` lines)"}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def tgi_events(svc: Service, handle: RequestHandle, max_tokens: int, prefix: str, seed):
    """TGI's stream: the final event is a token event that also carries generated_text and details.

    A token is held back only when it may be the last (EOS, max_tokens, or the request already
    finished), so that it can carry the final text; the others go out at once.
    """
    eos = svc.engine.eos_ids
    held: TokenEvent | None = None

    def token_event(e: TokenEvent, special: bool = False, fin: Finished | None = None) -> str:
        return sse_json({"index": e.index, "token": {"id": e.token_id, "text": e.text, "logprob": None,
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
        if not fin.finish_reason.completed:
            if held is not None:
                yield token_event(held)
            kind = "generation" if fin.finish_reason is FinishReason.ERROR else "cancelled"
            yield sse_json({"error": fin.error or "the request was cancelled", "error_type": kind})
        elif held is not None:
            yield token_event(held, fin=fin)
        else:
            # The request ended (stop sequence) after its last token was sent: close with an empty special token.
            last = TokenEvent(fin.token_ids[-1] if fin.token_ids else 0, "", fin.completion_tokens)
            yield token_event(last, special=True, fin=fin)


async def openai_chunks(svc: Service, handle: RequestHandle, rid: str, model: str, chat: bool,
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
        return sse_json(out)

    if chat:
        yield chunk("", role=True)
    async for event in svc.follow(handle):
        if isinstance(event, TokenEvent):
            if event.text:
                yield chunk(event.text)
            continue
        fin = event
        if (err := svc.failure(fin, openai=True)) is not None:
            yield sse_json({"error": {"message": err.message, "type": "server_error", "param": None,
                                   "code": fin.finish_reason}})
        else:
            yield chunk(None, fin.finish_reason.openai)
            if include_usage:
                yield sse_json({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                             "usage": usage(fin).model_dump(), "nbkit": stats(fin)})
    yield "[DONE]"


def stats(fin: Finished) -> dict:
    """What the chat page and panel show under a reply: speed and tokens per decoding step."""
    return {"steps": fin.steps, "mean_accepted": round(fin.mean_accepted, 4),
            "tokens_per_s": round(fin.tokens_per_s, 2)}


def usage(fin: Finished) -> Usage:
    return Usage(prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                 total_tokens=fin.prompt_tokens + fin.completion_tokens)

