"""TextStream: incremental detokenization and stop strings with bounded work per token.

Checked against the plain answer (decode everything, cut at the first stop) on the embedded model's real
tokenizer (byte-level BPE: multi-byte characters split across tokens, leading spaces), and for cost:
the tokenizer is never asked to decode more than a few tokens at a time, and long stop strings are refused
by the server (test_limits in tests/server).
"""

from __future__ import annotations

import random
import time

import pytest

from nbkit.engine.request import TextStream

TEXT = ("Héllo wörld! 日本語のテキスト 🙂🙂 and some plain English, with   spaces,\nnewlines and émojis 🎉. "
        "Stop here: STOP-MARK then more text ÄÖÜ.")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from nbkit.models import embedded_hf_dir

    return AutoTokenizer.from_pretrained(embedded_hf_dir())


def stream(tokenizer, ids, stop):
    ts, deltas = TextStream(tokenizer, stop), []
    for n in range(1, len(ids) + 1):
        delta, stopped = ts.update(ids[:n])
        deltas.append(delta)
        if stopped:
            return "".join(deltas), ts.text, True
    deltas.append(ts.final())
    return "".join(deltas), ts.text, False


@pytest.mark.parametrize("stop", [[], ["STOP-MARK"], ["🎉"], ["nothing like it", "wörld!"], ["ÄÖÜ."]])
def test_same_text_as_decoding_everything(tokenizer, stop):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [full.find(s) for s in stop if s in full]
    want = full[: min(cuts)] if cuts else full
    streamed, text, stopped = stream(tokenizer, ids, stop)
    assert stopped == bool(cuts)
    assert streamed == text == want


def test_random_byte_tokens_never_lose_text(tokenizer):
    # Tokens in an arbitrary order: incomplete UTF-8 sequences everywhere; the joined deltas equal the full decode.
    rng = random.Random(0)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]
    streamed, text, _ = stream(tokenizer, ids, [])
    assert streamed == text
    assert text == tokenizer.decode(ids, skip_special_tokens=True)  # U+FFFD included (tests/unit/test_text_is_decode.py)


class CountingTokenizer:
    """One character per token; records how many tokens each decode call is given."""

    def __init__(self):
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return "".join(chr(0x61 + i % 26) for i in ids)


@pytest.mark.slow  # a wall-clock ratio: out of `make test-fast`, which holds no timing assertion
def test_decode_and_stop_work_do_not_grow_with_the_output():
    tok = CountingTokenizer()
    stops = ["z" * 255 + "!"] * 4  # never matches, but every suffix of z's is a prefix of it
    ts = TextStream(tok, stops)
    ids = [25] * 3000  # "zzzz...": the worst case for holding back a possible stop
    times, out = [], []
    for n in range(1, len(ids) + 1):
        t0 = time.perf_counter()
        out.append(ts.update(ids[:n])[0])
        times.append(time.perf_counter() - t0)
    assert max(tok.sizes) <= 2  # the window: one token of context and the new one
    early, late = sorted(times[300:600])[150], sorted(times[-300:])[150]
    assert late < 3 * early + 1e-4  # the median cost per token stays flat
    assert "".join(out) == "z" * (3000 - 255)  # the last 255 may still start the stop string: held back
    assert "".join(out) + ts.final() == ts.text == "z" * 3000
