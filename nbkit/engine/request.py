"""Requests as the engine sees them: parameters, per-request state, and the stream of events.

A `RequestHandle` is what callers hold: iterate it (sync) or `async for` it (asyncio) to receive
`TokenEvent`s as they are generated, then one final `Finished`; `cancel()` frees the slot within a step.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass, field

import torch

from .boundaries import CutTracker, Joining, boundaries_of
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from .speculation.estimates import Probe, RequestAcceptance


class EngineError(RuntimeError):
    """Base class of errors the engine reports to callers."""


class Overloaded(EngineError):
    """The waiting queue is full: try again later (HTTP 429)."""


class EngineStopped(EngineError):
    """The engine is not running (stopped, or its thread died): requests cannot be served (HTTP 503)."""


class GrammarKind(enum.StrEnum):
    """What constrains a request's output (OpenAI's response_format, TGI's grammar, /generate's fields)."""

    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON valid against `GrammarSpec.value` (a JSON schema, as JSON text)
    REGEX = "regex"  # text matching `GrammarSpec.value` (a regular expression)


@dataclass(frozen=True)
class GrammarSpec:
    """A request's output constraint, as the client gave it (hashable: compiled grammars are cached by it)."""

    kind: GrammarKind
    value: str = ""  # the schema's JSON text or the regex ("" for any JSON object)


@dataclass
class SamplingParams:
    max_tokens: int = 50
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    speculate: bool = True  # allow Medusa for this request
    tree: str | None = None  # force a tree ("none", "chain-2", "mc_sim_7b_63"); None = the engine's policy
    acceptance: str = "exact"  # "exact" (greedy / lossless sampling) or "typical" (Medusa's, faster, lossy)
    ignore_eos: bool = False
    grammar: GrammarSpec | None = None  # constrained decoding (None: free text)
    logprobs: bool = False  # report each emitted token's log-probability (engine/logprobs.py says which)
    top_logprobs: int = 0  # and this many most likely tokens at its position (0-20; with logprobs)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.acceptance not in ("exact", "typical"):
            raise ValueError("acceptance must be 'exact' or 'typical'")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class RequestState(enum.Enum):
    """Where a request is in its life (one request's path: docs/architecture.md)."""

    WAITING = "waiting"  # queued, no slot yet
    PREFILLING = "prefilling"  # holds a slot; its prompt goes in chunk by chunk
    DECODING = "decoding"  # its first token is out; every step verifies a tree rooted at `pending`
    FINISHED = "finished"  # its Finished event is out; the slot is back


class FinishReason(enum.StrEnum):
    """Why a request ended (TGI's names, which the native API returns as they are)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"

    @property
    def completed(self) -> bool:
        """The request produced its answer (cancelled and failed ones did not)."""
        return self not in (FinishReason.CANCELLED, FinishReason.ERROR)

    @property
    def openai(self) -> str:
        """OpenAI's finish_reason: "stop" for an end of text or a stop sequence, else our name."""
        return "stop" if self in (FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE) else self.value

    @property
    def counter(self) -> str:
        """The engine counter that counts requests ending this way."""
        return {FinishReason.CANCELLED: "cancelled", FinishReason.ERROR: "errors"}.get(self, "finished")


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text released by this token (may be "" while a stop string or UTF-8 char is pending)
    index: int  # position in the output
    logprobs: TokenLogprob | None = None  # when the request asked for them (SamplingParams.logprobs)


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    steps: int  # decoding steps (verification passes), prefill excluded
    accepted_tokens: int  # tokens emitted by those steps
    time_to_first_token: float | None
    latency: float
    error: str | None = None
    error_type: str | None = None
    queue_time: float | None = None  # seconds from submit() to a slot (None: made outside the engine)
    # Prompt tokens whose KV was reused rather than prefilled (engine/prefix.py).
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when the request asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_accepted(self) -> float:
        """Tokens per decoding step, counting the bonus token (plain decoding = 1.0)."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.latency if self.latency > 0 else 0.0


class RequestHandle:
    """A request's event stream, shared between the engine thread and one consumer."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self._events: list[TokenEvent | Finished] = []
        self._cond = threading.Condition()
        self._loop = loop
        self._wakeup = asyncio.Event() if loop is not None else None
        self.cancelled = False

    # engine side
    def push(self, event: TokenEvent | Finished) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                self.cancelled = True

    # consumer side
    def cancel(self) -> None:
        """Stop generating (the client went away). The engine frees the slot at its next step."""
        self.cancelled = True

    @property
    def finished(self) -> Finished | None:
        with self._cond:
            last = self._events[-1] if self._events else None
        return last if isinstance(last, Finished) else None

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while len(self._events) <= i:
                    self._cond.wait()
                batch = self._events[i:]
            for event in batch:
                yield event
                if isinstance(event, Finished):
                    return
            i += len(batch)

    async def __aiter__(self):
        if self._wakeup is None:
            raise RuntimeError("submit() was called outside an event loop: iterate synchronously")
        i = 0
        while True:
            self._wakeup.clear()
            with self._cond:
                batch = self._events[i:]
            for event in batch:
                yield event
                if isinstance(event, Finished):
                    return
            i += len(batch)
            if not batch:
                await self._wakeup.wait()

    def result(self, timeout: float | None = None) -> Finished:
        """Block until the request ends (sync callers)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self._events and isinstance(self._events[-1], Finished)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
                self._cond.wait(left)
            return self._events[-1]

    async def aresult(self) -> Finished:
        async for event in self:
            if isinstance(event, Finished):
                return event
        raise AssertionError("unreachable")


class TextStream:
    """Incremental detokenization with stop strings: releases text only when it is final.

    The text equals `tokenizer.decode(ids, skip_special_tokens=True)` of the tokens so far, also when the
    model writes byte tokens that do not form valid UTF-8: text is cut between windows only where no later
    token can change it (boundaries.py says where, from how the tokenizer joins tokens).

    Work per token is bounded, whatever the output's length: only the tokens since the last final cut are
    decoded again (with the token before them, so that a tokenizer's leading-space rules see their context, as
    TGI and vLLM do), and stop strings are looked for only in the new characters plus the `len(stop) - 1`
    before them. A final cut is at most a few bytes away on byte-level BPE; with sentencepiece byte fallback a
    run of byte tokens decodes as a whole, so the window holds the run (a character takes 2-4 byte tokens).
    """

    MAX_PENDING = 8  # UNKNOWN tokenizers: tokens that may wait for an incomplete character before it is given out
    MAX_WINDOW = 256  # a run of byte tokens this long (a degenerate output) is given out as decoded so far

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.released = 0  # characters of the text already given out
        self.text = ""
        self._prefix = 0  # token index where the decode window starts (context for the tokens after `_read`)
        self._read = 0  # tokens whose text is in self.text
        self._ids: list[int] = []
        self._cuts = CutTracker(boundaries_of(tokenizer))
        self.stopped = False  # final() found a stop string in the text it flushed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _cut(self, token_ids: list[int], force: bool) -> int:
        """How many tokens to take into self.text now (self._read: none)."""
        if force or len(token_ids) - self._read >= self.MAX_WINDOW:
            return len(token_ids)
        if self._cuts.b.joining is not Joining.UNKNOWN:
            self._cuts.feed(token_ids)
            return max(self._cuts.final, self._read)
        if len(token_ids) - self._read >= self.MAX_PENDING:
            return len(token_ids)
        window = self._decode(token_ids[self._prefix:])
        known = self._decode(token_ids[self._prefix:self._read])
        complete = len(window) > len(known) and not window.endswith("\ufffd")
        return len(token_ids) if complete else self._read

    def _advance(self, token_ids: list[int], force: bool = False) -> int:
        """Append the text of the new tokens up to the latest final cut; returns the text's length before."""
        self._ids = token_ids
        before = len(self.text)
        cut = self._cut(token_ids, force)
        if cut <= self._read:
            return before
        known = self._decode(token_ids[self._prefix:self._read])
        self.text += self._decode(token_ids[self._prefix:cut])[len(known):]
        if self._cuts.b.joining is Joining.UNKNOWN:
            self._prefix = self._read  # the last window is the next one's context
        else:
            self._prefix = self._cuts.context(cut, token_ids)
        self._read = cut
        return before

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """Text newly released by the tokens so far, and whether a stop string was hit (text cut there)."""
        return self._release(self._advance(token_ids), hold=True)

    def final(self) -> str:
        """Everything not yet released (at the end of the request), an incomplete character included; cut at
        a stop string if the flushed text holds one (a character completed by the last tokens)."""
        delta, self.stopped = self._release(self._advance(self._ids, force=True), hold=False)
        return delta

    def _release(self, before: int, hold: bool) -> tuple[str, bool]:
        """The text not yet given out, cut at the first stop string in the characters from `before` on; with
        `hold`, less any suffix that may start a stop string (incomplete characters are not in self.text yet)."""
        text = self.text
        hit = -1
        for s in self.stop:
            at = text.find(s, max(0, before - len(s) + 1))
            if at != -1 and (hit == -1 or at < hit):
                hit = at
        if hit != -1:
            self.text = text[:hit]
            delta = self.text[self.released:]
            self.released = len(self.text)
            return delta, True
        end = len(text) - (max((_partial_stop(text, s) for s in self.stop), default=0) if hold else 0)
        delta = text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return delta, False


def _partial_stop(text: str, stop: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `stop` (0 if none).

    Only the last len(stop) - 1 characters are examined, and only where stop's first character occurs."""
    tail = text[max(0, len(text) - (len(stop) - 1)):] if len(stop) > 1 else ""
    i = tail.find(stop[0]) if tail else -1
    while i != -1:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0


@dataclass
class Request:
    """Engine-side state of one request (a "slot" holds its KV while it runs)."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    text: TextStream
    created: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when it got a slot (None: still waiting, or never admitted)
    state: RequestState = RequestState.WAITING
    slot: int | None = None
    n_prefilled: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not prefilled (prefix.py)
    output_ids: list[int] = field(default_factory=list)
    pending: int | None = None  # last emitted token, not yet in the KV cache (the next tree's root); DECODING
    # The final-norm hidden state that produced `pending`, once the runner returned one (llama.cpp's prefill does
    # not: its heads wait for the first verify step's); the heads are ready when it is known.
    hidden: torch.Tensor | None = None
    heads_ready: bool = False
    carried: int = 0  # speculative tokens accepted last step (a runner that recomputes them decodes them again)
    steps: int = 0
    accepted_tokens: int = 0
    first_token_at: float | None = None
    generator: torch.Generator | None = None  # seeded draws of a sampled request (None: greedy)
    probes: list[Probe] = field(default_factory=list)  # heads' top-k awaiting the tokens that followed
    acceptance: RequestAcceptance | None = None  # the request's own acceptance counts (set when admitted)
    spec_steps: int = 0  # steps that verified a tree
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per emitted token, when asked (may run ahead)
    grammar: object | None = None  # its GrammarState (grammar.py) when the output is constrained

    def finished(self, reason: FinishReason, error: str | None = None, error_type: str | None = None) -> Finished:
        """The request's last event (its state is FINISHED from now on)."""
        self.state = RequestState.FINISHED
        now = time.monotonic()
        ttft = None if self.first_token_at is None else self.first_token_at - self.created
        queued = (self.admitted_at if self.admitted_at is not None else now) - self.created  # never admitted: all
        return Finished(self.text.text, list(self.output_ids), reason, len(self.prompt_ids), self.steps,
                        self.accepted_tokens, ttft, now - self.created, error,
                        (error_type or "generation") if reason is FinishReason.ERROR else None, queued,
                        self.cached_tokens, logprobs=self.logprobs[:len(self.output_ids)])

    def set_hidden(self, hidden: torch.Tensor) -> None:
        """The hidden state behind `pending` (an empty one: the runner did not compute it)."""
        self.hidden, self.heads_ready = hidden, hidden.numel() > 0

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The request's generator on `device`, where its logits live (CUDA's multinomial refuses a CPU
        generator). Made again, with the same seed, only before the first draw: a runner whose logits come
        back to the host (llama.cpp) while its hidden states stay on the GPU."""
        gen = self.generator
        if gen is not None and gen.device != device:
            gen = self.generator = torch.Generator(device=device).manual_seed(gen.initial_seed())
        return gen
