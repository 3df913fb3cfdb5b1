"""Postprocess, per request: append the accepted tokens to its output, stream them, and say whether it ends.

Kept apart from the engine's step so that the stages the step grows (grammar, logprobs, prefix reuse) each
have their own module; this one knows only a request, its tokens and the model's end-of-sequence ids.
"""

from __future__ import annotations

import time

from .request import FinishReason, Request, TokenEvent


def emit_tokens(r: Request, tokens: list[int], eos_ids: set[int], counters: dict) -> FinishReason | None:
    """Stream `tokens` for `r`, stopping at the first that ends it; returns why it ends (None: it goes on)."""
    now = time.monotonic()
    for tok in tokens:
        if r.first_token_at is None:
            r.first_token_at = now
        r.output_ids.append(tok)
        r.pending = tok
        counters["tokens"] += 1
        reason = None
        if tok in eos_ids and not r.params.ignore_eos:
            reason, delta = FinishReason.EOS_TOKEN, ""
        else:
            delta, stopped = r.text.update(r.output_ids)
            if stopped:
                reason = FinishReason.STOP_SEQUENCE
            elif len(r.output_ids) >= r.params.max_tokens:
                reason = FinishReason.LENGTH
        if reason in (FinishReason.EOS_TOKEN, FinishReason.LENGTH):
            delta += r.text.final()  # text held back in case a stop string was starting
            if r.text.stopped:  # a stop string completed in that held-back text: it is why the answer ends
                reason = FinishReason.STOP_SEQUENCE
        index = len(r.output_ids) - 1
        r.handle.push(TokenEvent(tok, delta, index, r.logprobs[index] if index < len(r.logprobs) else None))
        if reason is not None:
            return reason
    return None
