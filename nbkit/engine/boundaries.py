"""Where the text of a token sequence is final: the cuts after which no later token changes earlier text.

TextStream decodes a short window of tokens at a time. Its text equals the tokenizer's decode of all the ids
only if every cut between windows is one where `decode(a + b) == decode(a) + decode(b)` holds whatever `b`
turns out to be. Where that holds depends on how the tokenizer's decoder joins tokens:

- BYTE_LEVEL (GPT-2 style BPE, SmolLM2, Llama 3, Qwen): every token is bytes, and decode is the UTF-8 decoding
  of their concatenation with invalid bytes replaced, per maximal invalid subpart. A cut is final where the
  UTF-8 decoder holds no incomplete sequence, or where the next byte cannot continue one (it is not
  0x80-0xBF): that byte ends the pending sequence, whatever comes after. So a cut is never more than four bytes
  away.
- PIECES (sentencepiece with byte fallback, Llama 2, vicuna; any other tokenizer with pieces): text pieces and
  `<0xHH>` byte pieces. A run of consecutive byte pieces decodes as a whole (valid UTF-8, or one U+FFFD per
  byte), so a cut is final only where a text piece is on one side of it.
- UNKNOWN (no pieces to look at): the text is taken as final when it does not end in U+FFFD (an incomplete
  UTF-8 character).

Special tokens are skipped by decode (skip_special_tokens), so they are transparent here: the bytes on either
side of one join.
"""

from __future__ import annotations

import codecs
import re
from enum import Enum

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Joining(Enum):
    BYTE_LEVEL = "byte_level"
    PIECES = "pieces"
    UNKNOWN = "unknown"


def _joining(tokenizer) -> Joining:
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return Joining.UNKNOWN
    if getattr(tokenizer, "byte_decoder", None) is not None:  # a Python GPT-2 tokenizer
        return Joining.BYTE_LEVEL
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in repr(backend.decoder):
        return Joining.BYTE_LEVEL
    return Joining.PIECES


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _skipped_ids(tokenizer) -> frozenset[int]:
    """The ids decode(skip_special_tokens=True) drops: the declared special tokens, and every added token marked
    special (SmolLM2's `<repo_name>` and friends are not in `all_special_ids`, yet decode skips them)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


class TokenBoundaries:
    """A tokenizer's joining rule and what each token is under it (looked up once per token id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.joining = _joining(tokenizer)
        self.special = _skipped_ids(tokenizer)
        self._byte_of = _gpt2_byte_decoder() if self.joining is Joining.BYTE_LEVEL else {}
        self._bytes: dict[int, bytes] = {}
        self._is_byte_piece: dict[int, bool] = {}

    def token_bytes(self, token_id: int) -> bytes:
        """BYTE_LEVEL: the bytes a token stands for."""
        found = self._bytes.get(token_id)
        if found is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if all(c in self._byte_of for c in piece):
                found = bytes(self._byte_of[c] for c in piece)
            else:  # an added token, outside the byte alphabet: decoded as its own text
                found = self.tokenizer.decode([token_id]).encode("utf-8", "surrogatepass")
            self._bytes[token_id] = found
        return found

    def is_byte_piece(self, token_id: int) -> bool:
        """PIECES: whether a token is a byte-fallback piece `<0xHH>`."""
        found = self._is_byte_piece.get(token_id)
        if found is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            found = self._is_byte_piece[token_id] = isinstance(piece, str) and BYTE_PIECE.fullmatch(piece) is not None
        return found


class CutTracker:
    """Follows one output token by token (constant work per token) and knows its latest final cut."""

    def __init__(self, boundaries: TokenBoundaries):
        self.b = boundaries
        self.seen = 0  # tokens looked at
        self.final = 0  # the latest index j where the cut before token j is final (among tokens seen)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._last_was_byte = False  # PIECES: the last non-special token is a byte piece

    def feed(self, token_ids: list[int]) -> None:
        for j in range(self.seen, len(token_ids)):
            t = token_ids[j]
            if t in self.b.special:
                continue
            if self._cut_before(t):
                self.final = j
        self.seen = len(token_ids)
        if self._clean_end():
            self.final = self.seen

    def _cut_before(self, t: int) -> bool:
        if self.b.joining is Joining.BYTE_LEVEL:
            data = self.b.token_bytes(t)
            pending = self._utf8.getstate()[0]
            self._utf8.decode(data)
            return not pending or not data or not 0x80 <= data[0] <= 0xBF
        is_byte = self.b.is_byte_piece(t)
        cut = not (is_byte and self._last_was_byte)
        self._last_was_byte = is_byte
        return cut

    def _clean_end(self) -> bool:
        if self.b.joining is Joining.BYTE_LEVEL:
            return not self._utf8.getstate()[0]
        return not self._last_was_byte

    def context(self, cut: int, token_ids: list[int]) -> int:
        """Where a window that starts at `cut` should start decoding: at the last non-special token before it,
        so that the tokenizer's leading-space rule sees its context (a skipped special token gives none)."""
        j = cut - 1
        while j >= 0 and token_ids[j] in self.b.special:
            j -= 1
        return j if j >= 0 else cut


_BOUNDARIES: dict[int, TokenBoundaries] = {}  # per tokenizer (id(tokenizer); the entry keeps it alive)


def boundaries_of(tokenizer) -> TokenBoundaries:
    """The tokenizer's TokenBoundaries, made once (its per-token lookups are cached in it)."""
    found = _BOUNDARIES.get(id(tokenizer))
    if found is None or found.tokenizer is not tokenizer:
        found = _BOUNDARIES[id(tokenizer)] = TokenBoundaries(tokenizer)
    return found
