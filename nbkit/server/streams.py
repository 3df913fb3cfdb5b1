"""Server-sent event streams: TGI's token events and OpenAI's chunks, from one request's engine events."""

from __future__ import annotations

import asyncio
import json
import time

from ..engine.request import Finished, FinishReason, RequestHandle, TokenEvent
from .logprobs import TokenLog
from .schemas import PromptTokensDetails, Usage
from .service import Service
from .tools import ToolPlan, ToolStream

# OpenAPI: routes that answer JSON, or SSE events when the body says `stream: true`.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "required": ["data"]}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                  "description": "JSON, or with `stream: true` Server-Sent Events (`data: {...}` lines)"}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def tgi_events(svc: Service, handle: RequestHandle, max_tokens: int, prefix: str, seed,
                     log: TokenLog | None = None):
    """TGI's stream: the final event is a token event that also carries generated_text and details.

    A token is held back only when it may be the last (EOS, max_tokens, or the request already
    finished), so that it can carry the final text; the others go out at once. With `log` (the request
    asked for details or top_n_tokens) each token carries its logprob, and top_tokens when asked.
    """
    eos = svc.engine.eos_ids
    held: TokenEvent | None = None

    def token_event(e: TokenEvent, special: bool = False, fin: Finished | None = None) -> str:
        token = {"id": e.token_id, "text": e.text, "logprob": None, "special": special or e.token_id in eos}
        out = {"index": e.index, "token": token, "generated_text": None if fin is None else prefix + fin.text,
               "details": None if fin is None else {"finish_reason": fin.finish_reason,
                                                    "generated_tokens": fin.completion_tokens, "seed": seed}}
        if log is not None and e.logprobs is not None:
            piece, top = log.tgi(e.logprobs)
            token["logprob"] = piece["logprob"]
            if top:
                out["top_tokens"] = top
        return sse_json(out)

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


async def follow_all(svc: Service, handles: list[RequestHandle]):
    """(choice index, event) from several requests as their events arrive; each ends with its Finished."""
    streams = [svc.follow(h) for h in handles]
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                i = pending.pop(future)
                event = future.result()
                yield i, event
                if not isinstance(event, Finished):
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for future in pending:
            future.cancel()
        # A stream's step must have ended before the stream is closed (aclose() refuses a running generator).
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # a gone client: follow() cancels its request


class _Chunker:
    """Builds one OpenAI chunk of choice i; holds each choice's logprob entries until text goes with them."""

    def __init__(self, svc: Service, n: int, rid: str, model: str, chat: bool, include_usage: bool,
                 logprobs: bool):
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "system_fingerprint": svc.fingerprint}
        self.chat, self.include_usage = chat, include_usage
        self.logs = [svc.token_log() for _ in range(n)] if logprobs else []
        self.waiting: list[list] = [[] for _ in range(n)]  # each choice's entries not yet sent

    def hold(self, i: int, event: TokenEvent) -> None:
        if self.logs and event.logprobs is not None:
            self.waiting[i].append(event.logprobs)

    def __call__(self, i: int, text: str | None, finish_reason: str | None = None, role: bool = False,
                 delta: dict | None = None) -> str:
        entries, self.waiting[i] = self.waiting[i], []
        lp = None
        if entries:
            lp = self.logs[i].openai_chat(entries) if self.chat else self.logs[i].openai_completion(entries)
        if self.chat:
            if delta is None:
                delta = {} if text is None else ({"role": "assistant", "content": text} if role else {"content": text})
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        out = {**self.head, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return sse_json(out)


async def openai_chunks(svc: Service, handles: list[RequestHandle], rid: str, model: str, chat: bool,
                        include_usage: bool, logprobs: bool = False, tools: ToolPlan | None = None, n: int = 1):
    """OpenAI's chunks, each with its choice's index (handles[i] is choice i; n choices per prompt). With
    `logprobs`, a chunk carries the log-probabilities of the tokens whose text it sends (a token whose text is
    held back, a stop string or a character in progress, goes with the next); with `tools`, a ToolStream per
    choice turns the text into tool_calls deltas."""
    chunk = _Chunker(svc, len(handles), rid, model, chat, include_usage, logprobs)
    shapers = [ToolStream(tools) for _ in handles] if tools is not None else None  # text -> tool_calls deltas
    if chat:
        for i in range(len(handles)):
            yield chunk(i, "", role=True)
    fins: dict[int, Finished] = {}
    async for i, event in follow_all(svc, handles):
        if isinstance(event, TokenEvent):
            chunk.hold(i, event)
            if event.text:
                for out in _pieces(chunk, shapers, i, event.text):
                    yield out
            continue
        fin = event
        if (err := svc.failure(fin, openai=True)) is not None:
            yield sse_json({"error": {"message": err.message, "type": "server_error", "param": None,
                                      "code": fin.finish_reason}})
            break  # follow_all's exit cancels the other choices
        fins[i] = fin
        for out in _closing(chunk, shapers, i, fin.finish_reason.openai):
            yield out
    if include_usage and len(fins) == len(handles):
        counts = usage([fins[i] for i in range(len(handles))], n).model_dump()
        yield sse_json({**chunk.head, "choices": [], "usage": counts,
                        "nbkit": stats(fins[0]) if len(fins) == 1 else None})
    yield "[DONE]"


def _pieces(chunk, shapers: list[ToolStream] | None, i: int, text: str) -> list[str]:
    """The chunks of a piece of choice i's text: its content, or what its ToolStream makes of it."""
    return [chunk(i, text)] if shapers is None else [chunk(i, None, delta=d) for d in shapers[i].feed(text)]


def _closing(chunk, shapers: list[ToolStream] | None, i: int, reason: str) -> list[str]:
    """The last chunks of choice i: what its ToolStream still held, then the finish reason."""
    if shapers is None:
        return [chunk(i, None, reason)]
    held = [chunk(i, None, delta=d) for d in shapers[i].close()]
    return held + [chunk(i, None, shapers[i].finish_reason(reason))]


def stats(fin: Finished) -> dict:
    """What the chat page and panel show under a reply: speed and tokens per decoding step."""
    return {"steps": fin.steps, "mean_accepted": round(fin.mean_accepted, 4),
            "tokens_per_s": round(fin.tokens_per_s, 2)}


def usage(fins: list[Finished], n: int = 1) -> Usage:
    """Token counts of `fins`, n choices per prompt in a row: each prompt counts once, and its cached tokens are
    those of the choice that reused least (the one that prefilled the prompt for the others)."""
    prompts = [fins[k : k + n] for k in range(0, len(fins), n)]
    prompt = sum(group[0].prompt_tokens for group in prompts)
    cached = sum(min(f.cached_tokens for f in group) for group in prompts)
    completion = sum(f.completion_tokens for f in fins)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

