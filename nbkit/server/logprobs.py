"""Log-probabilities in each API's shape, from the engine's TokenLogprob entries (nbkit/engine/logprobs.py says
which distribution they come from).

- OpenAI chat: `choices[].logprobs.content[]` = {token, logprob, bytes, top_logprobs[{token, logprob, bytes}]};
- OpenAI completions: `choices[].logprobs` = {tokens, token_logprobs, top_logprobs (dicts, the chosen token
  included as OpenAI does), text_offset (characters into the completion's text)};
- TGI: `details.tokens[]` / a stream event's `token` = {id, text, logprob, special}; `top_n_tokens` adds
  `details.top_tokens` (one list per token) / a stream event's `top_tokens`.

Token texts are consistent with the served text: a token's text is what it adds to the decode of the output
before it (decoded with the previous token as context, as TextStream does, so that sentencepiece's leading space
comes out as in the answer); a byte token of an incomplete UTF-8 character shows U+FFFD and its `bytes` are exact
(byte-level BPE: the token's own bytes; sentencepiece: the `<0xHH>` byte). A special token (EOS) shows its own
text, as TGI does. A log-probability of -inf (a token top-k or top-p excludes) is sent as -9999.0, OpenAI's
stand-in: JSON has no infinity.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.boundaries import BYTE_PIECE, Joining, boundaries_of
from ..engine.logprobs import TokenLogprob

FLOOR = -9999.0


@dataclass(frozen=True)
class Piece:
    """A token as the APIs show it."""

    token_id: int
    text: str
    data: bytes
    logprob: float
    special: bool


class TokenLog:
    """One choice's tokens in output order: each token's text needs the token before it."""

    def __init__(self, tokenizer, special_ids: set[int]):
        self.tokenizer, self.b = tokenizer, boundaries_of(tokenizer)
        self.special = set(special_ids) | set(self.b.special)
        self.prev: int | None = None  # the last token, context for the next one's text
        self.offset = 0  # characters of the completion's text before the next token

    def next(self, entry: TokenLogprob) -> tuple[Piece, list[Piece]]:
        """The token's piece and its top alternatives' (at the same position)."""
        head = None if self.prev is None or self.prev in self.special else self.tokenizer.decode([self.prev])
        chosen = self._piece(head, entry.token_id, entry.logprob)
        top = [self._piece(head, t, lp) for t, lp in entry.top]
        self.prev = entry.token_id
        return chosen, top

    def _piece(self, head: str | None, token: int, logprob: float) -> Piece:
        lp = logprob if logprob > FLOOR else FLOOR
        if token in self.special:
            text = self.tokenizer.decode([token])  # not skipped: TGI and OpenAI show "</s>"
            return Piece(token, text, text.encode("utf-8"), lp, True)
        data = self._bytes(token)
        if data is not None:
            return Piece(token, data.decode("utf-8", "replace"), data, lp, False)
        if head is None:
            text = self.tokenizer.decode([token])
        else:
            both = self.tokenizer.decode([self.prev, token])
            text = both[len(head):] if both.startswith(head) else both
        return Piece(token, text, text.encode("utf-8", "surrogatepass"), lp, False)

    def _bytes(self, token: int) -> bytes | None:
        """The token's exact bytes where the tokenizer says them (None: its text says them)."""
        if self.b.joining is Joining.BYTE_LEVEL:
            return self.b.token_bytes(token)
        if self.b.joining is Joining.PIECES and self.b.is_byte_piece(token):
            return bytes([int(BYTE_PIECE.fullmatch(self.tokenizer.convert_ids_to_tokens(token)).group(1), 16)])
        return None

    # ---- the APIs' shapes ----------------------------------------------------------------------
    def openai_chat(self, entries: list[TokenLogprob]) -> dict:
        content = []
        for entry in entries:
            chosen, top = self.next(entry)
            content.append({**_openai(chosen), "top_logprobs": [_openai(p) for p in top]})
        return {"content": content, "refusal": None}

    def openai_completion(self, entries: list[TokenLogprob]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            chosen, top = self.next(entry)
            out["tokens"].append(chosen.text)
            out["token_logprobs"].append(chosen.logprob)
            top_dict: dict[str, float] = {}
            for p in [*top, chosen]:  # two tokens with one text: the likelier one's; the chosen one always in
                top_dict.setdefault(p.text, p.logprob)
            out["top_logprobs"].append(top_dict)
            out["text_offset"].append(self.offset)
            self.offset += 0 if chosen.special else len(chosen.text)
        return out

    def tgi(self, entry: TokenLogprob) -> tuple[dict, list[dict]]:
        chosen, top = self.next(entry)
        return _tgi(chosen), [_tgi(p) for p in top]


def _openai(p: Piece) -> dict:
    return {"token": p.text, "logprob": p.logprob, "bytes": list(p.data)}


def _tgi(p: Piece) -> dict:
    return {"id": p.token_id, "text": p.text, "logprob": p.logprob, "special": p.special}
