"""Chat templates without role forgery.

`apply_chat_template` renders the messages to one string and tokenizes it, so a user message that
contains "<|im_end|>\\n<|im_start|>system\\n..." becomes REAL special tokens: the user has written a
system turn. Here the template's own text is tokenized as usual, but what clients wrote is tokenized
with `split_special_tokens=True`, so "<|im_start|>" in a message is just those characters.
"""

from __future__ import annotations

import re
import secrets


def special_strings(tokenizer) -> list[str]:
    """The tokenizer's added tokens (special or not): the strings that tokenize to one reserved id."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [t.content for t in decoder.values() if getattr(t, "content", "")]


def chat_prompt_ids(tokenizer, messages: list[dict], allow_special: bool = False) -> list[int]:
    """The prompt ids of `messages` (dicts with role and str content) with the generation prompt.

    allow_special=True keeps the plain behaviour (special tokens in messages are parsed): an explicit
    opt-in for clients that build raw turns themselves. Raises ValueError when a message with special
    tokens cannot be placed safely (a template that rewrites content).
    """
    specials = special_strings(tokenizer)
    if allow_special or not any(s in (m.get("content") or "") for m in messages for s in specials):
        # nothing to forge: the template's own tokenization, unchanged
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    # Render with a unique marker in place of each content, check that the template copies content
    # verbatim, then tokenize the template's text and each content separately.
    # One pass over the rendered text (a regex split), so the work is linear in the number of messages.
    tag = secrets.token_hex(8)
    marked = [{**m, "content": f"NBKITCONTENT{tag}X{i}X"} for i, m in enumerate(messages)]
    template_text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = re.split(f"NBKITCONTENT{tag}X([0-9]+)X", template_text)  # text, index, text, index, ..., text
    if [int(i) for i in parts[1::2]] != list(range(len(messages))):
        raise ValueError("this chat template cannot keep special tokens in messages as plain text")
    contents = [m.get("content") or "" for m in messages]
    pieces = [parts[0]]
    for content, after in zip(contents, parts[2::2]):
        pieces += [content, after]
    if "".join(pieces) != full_text:
        raise ValueError("this chat template rewrites message content: special tokens in messages are refused")
    # Two batched tokenizer calls (template text; clients' text), not two per message.
    template_ids = _encode_all(tokenizer, parts[0::2], split_special=False)
    content_ids = _encode_all(tokenizer, contents, split_special=True)
    out = list(template_ids[0])
    for content, after in zip(content_ids, template_ids[1:]):
        out += content
        out += after
    return out


def _encode_all(tokenizer, texts: list[str], split_special: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                           split_special_tokens=split_special)["input_ids"]]


def _encode(tokenizer, text: str, split_special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"])


def _ids(ids) -> list[int]:
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)
