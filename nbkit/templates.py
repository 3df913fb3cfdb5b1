"""Chat templates: the one place prompts become chat-formatted ids (engine, server, distillation, benchmarks).

`user_prompt_ids` is one trusted user turn (the CLI, distillation, benchmarks); `chat_prompt_ids`
is what the server uses for clients' messages, without role forgery:

`apply_chat_template` renders the messages to one string and tokenizes it, so a user message that
contains "<|im_end|>\\n<|im_start|>system\\n..." becomes REAL special tokens: the user has written a
system turn. Here the template's own text is tokenized as usual, but what clients wrote is tokenized
with `split_special_tokens=True`, so "<|im_start|>" in a message is just those characters.
"""

from __future__ import annotations

import secrets


def special_strings(tokenizer) -> list[str]:
    """The tokenizer's added tokens (special or not): the strings that tokenize to one reserved id."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [t.content for t in decoder.values() if getattr(t, "content", "")]


def user_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """One user turn with the generation prompt; special tokens written in `prompt` are parsed (trusted text)."""
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], allow_special=True)


def chat_prompt_ids(tokenizer, messages: list[dict], allow_special: bool = False) -> list[int]:
    """The prompt ids of `messages` (dicts with role and str content) with the generation prompt.

    allow_special=True keeps the plain behaviour (special tokens in messages are parsed): an explicit
    opt-in for clients that build raw turns themselves. Raises ValueError when a message with special
    tokens cannot be placed safely (a template that rewrites content).
    """
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
    specials = special_strings(tokenizer)
    if allow_special or not any(s in (m.get("content") or "") for m in messages for s in specials):
        return ids  # nothing to forge: the template's own tokenization, unchanged
    # Render with a unique marker in place of each content, check that the template copies content
    # verbatim, then tokenize the template's text and each content separately.
    tag = secrets.token_hex(8)
    marks = [f"NBKITCONTENT{tag}X{i}X" for i in range(len(messages))]
    marked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    template_text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rebuilt = template_text
    for m, mark in zip(messages, marks):
        if template_text.count(mark) != 1:
            raise ValueError("this chat template cannot keep special tokens in messages as plain text")
        rebuilt = rebuilt.replace(mark, m.get("content") or "")
    if rebuilt != full_text:
        raise ValueError("this chat template rewrites message content: special tokens in messages are refused")
    out, rest = [], template_text
    for m, mark in zip(messages, marks):
        before, rest = rest.split(mark, 1)
        out += _encode(tokenizer, before, split_special=False)
        out += _encode(tokenizer, m.get("content") or "", split_special=True)
    return out + _encode(tokenizer, rest, split_special=False)


def _encode(tokenizer, text: str, split_special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"])


def _ids(ids) -> list[int]:
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)
