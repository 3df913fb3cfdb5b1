"""How prompts become token ids, for every engine and entry point (server, CLI, notebooks, bench, distillation).

Raw prompts: `tokenizer(prompt)` semantics, so BOS is added when the tokenizer adds one (Llama/vicuna `<s>`,
as in the original design and TGI; SmolLM2's tokenizer adds none). Special tokens written in a raw prompt
are real: the client wrote the whole prompt.

Chat messages: the tokenizer's chat template, or, when it has none (vicuna-7b-v1.3 and other Llama-1-era
repositories), FastChat's vicuna_v1.1 conversation, the format vicuna was trained on.

Tools (OpenAI's `tools`, assistant `tool_calls`, `role: "tool"` results): a chat template that knows tools
(one that reads a `tools` variable) gets them as `apply_chat_template(..., tools=...)`. Other models (vicuna,
SmolLM2) get `tool_messages`, a plain-text format any chat model can follow:
- a system message (after the client's own system text, if any) that lists each function as JSON
  (`{"name", "description", "parameters"}`, one a line) and asks for a call as JSON alone:
  `{"name": "<function>", "arguments": {...}}`, or a JSON list of such objects for several calls;
- an assistant turn that called functions is its text (if any) followed by the calls in that same JSON;
- tool results become one user turn: `Function <name> returned: <content>`, one line per result.

Role forgery: `apply_chat_template` renders the messages to one string and tokenizes it, so a user message
that contains "<|im_end|>\\n<|im_start|>system\\n..." (or "</s>USER:" for vicuna) becomes REAL special tokens:
the user has written a turn of their own. Here the template's own text is tokenized as usual, but what
clients wrote is tokenized with `split_special_tokens=True`, so "<|im_start|>" in a message is just those
characters.
"""

from __future__ import annotations

import json
import re
import secrets

# FastChat's vicuna_v1.1 (conversation.py): system line, "USER: {msg} ASSISTANT: {reply}</s>", generation
# prompt "ASSISTANT:", single spaces as separators; the tokenizer adds BOS in front.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VICUNA_ROLES = {"user": "USER", "assistant": "ASSISTANT"}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A raw prompt's ids as `tokenizer(prompt)` gives them: BOS first when the tokenizer adds one.
    An empty prompt stays empty (callers refuse it) rather than becoming a lone BOS."""
    if not prompt:
        return []
    return _ids(tokenizer(prompt))


def user_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """One trusted user turn with the generation prompt (the CLI, distillation, benchmarks): special tokens
    written in `prompt` are parsed."""
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], allow_special=True)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def special_strings(tokenizer) -> list[str]:
    """The tokenizer's added tokens (special or not): the strings that tokenize to one reserved id."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [t.content for t in decoder.values() if getattr(t, "content", "")]


def knows_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders OpenAI-style tools itself (it reads `tools`)."""
    return bool(re.search(r"\btools\b", getattr(tokenizer, "chat_template", None) or ""))


def chat_prompt_ids(tokenizer, messages: list[dict], allow_special: bool = False,
                    tools: list[dict] | None = None) -> list[int]:
    """The prompt ids of `messages` (dicts with role and str content; assistant `tool_calls` and `tool`
    results too) with the generation prompt; `tools` are OpenAI function definitions (the `function` objects).

    allow_special=True keeps the plain behaviour (special tokens in messages are parsed): an explicit
    opt-in for clients that build raw turns themselves. Raises ValueError when a message with special
    tokens cannot be placed safely (a template that rewrites content).
    """
    template_tools = bool(tools) and knows_tools(tokenizer)
    if template_tools:  # templates index arguments as objects (`arguments | tojson`), not as JSON text
        messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    else:  # the plain-text format: tools and calls become ordinary messages
        messages = tool_messages(messages, tools or [], vicuna=not has_chat_template(tokenizer))
    if not has_chat_template(tokenizer):
        return vicuna_prompt_ids(tokenizer, messages, allow_special)
    specials = special_strings(tokenizer)
    extra = {"tools": [{"type": "function", "function": f} for f in tools]} if template_tools else {}
    if template_tools and not allow_special and any(s in json.dumps(tools, ensure_ascii=False) for s in specials):
        raise ValueError("special tokens in tool definitions are refused (they would open turns of their own)")
    if allow_special or not any(s in (m.get("content") or "") for m in messages for s in specials):
        # nothing to forge: the template's own tokenization, unchanged
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False, **extra))
    # Render with a unique marker in place of each content, check that the template copies content
    # verbatim, then tokenize the template's text and each content separately.
    # One pass over the rendered text (a regex split), so the work is linear in the number of messages.
    tag = secrets.token_hex(8)
    marked = [{**m, "content": f"NBKITCONTENT{tag}X{i}X"} for i, m in enumerate(messages)]
    template_text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False, **extra)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
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
    """A list of ids from a tokenizer call (a BatchEncoding or dict) or apply_chat_template (a list)."""
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# --- tools as plain text, for chat templates that know none ----------------------------------------------
TOOLS_PREAMBLE = ("You can call these functions:\n{functions}\nTo call a function, answer with JSON alone: "
                  '{{"name": "<function name>", "arguments": {{<its arguments>}}}}, or a JSON list of such objects '
                  "to call several. Otherwise answer in text.")


def tools_preamble(tools: list[dict]) -> str:
    lines = [json.dumps({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None},
                        ensure_ascii=False) for f in tools]
    return TOOLS_PREAMBLE.format(functions="\n".join(lines))


def call_text(calls: list[dict]) -> str:
    """Calls ({"name", "arguments": JSON text or object}) as the format asks the model to write them."""
    objs = [{"name": c["name"], "arguments": _arguments(c["arguments"])} for c in calls]
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


def _arguments(arguments):
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # kept as the client sent it: the model sees what was called


def tool_messages(messages: list[dict], tools: list[dict], vicuna: bool = False) -> list[dict]:
    """`messages` with tools, assistant calls and tool results in the plain-text format (module docstring)."""
    names = {c.get("id"): c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "tool":
            line = f"Function {names.get(m.get('tool_call_id'), m.get('name') or 'a function')} returned: " \
                   f"{m.get('content') or ''}"
            if out and out[-1].get("tool_result"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + line}
            else:
                out.append({"role": "user", "content": line, "tool_result": True})
        elif m.get("tool_calls"):
            calls = call_text([c["function"] for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content"), calls]))})
        else:
            out.append({"role": m["role"], "content": m.get("content")})
    if tools:
        systems = [m for m in out if m["role"] == "system"]
        first = (systems[-1]["content"] or "") if systems else (VICUNA_SYSTEM if vicuna else "")
        system = {"role": "system", "content": "\n\n".join(filter(None, [first, tools_preamble(tools)]))}
        out = [system] + [m for m in out if m["role"] != "system"]
    return [{"role": m["role"], "content": m["content"]} for m in out]


# --- vicuna v1.1, for tokenizers without a chat template ---------------------------------------------------
def vicuna_pieces(messages: list[dict]) -> list[tuple[str, str]]:
    """The conversation as (kind, text) pieces: "template" (our text), "content" (what a client wrote) and
    "eos" (the `</s>` that closes each assistant turn). A system message replaces the default system line.

    Every piece after the first starts at a word boundary (the separator space goes with the piece that
    follows it) or right after an "eos": piecewise tokenization then equals tokenizing the whole text."""
    systems = [m for m in messages if m.get("role") == "system"]
    pieces = [("content", systems[-1].get("content") or "") if systems else ("template", VICUNA_SYSTEM)]
    for m in messages:
        role = m.get("role")
        if role == "system":
            continue
        if role not in VICUNA_ROLES:
            raise ValueError(f"vicuna's conversation format has no role {role!r} (use system, user or assistant)")
        after_eos = pieces[-1][0] == "eos"
        pieces += [("template", f"{'' if after_eos else ' '}{VICUNA_ROLES[role]}:"),
                   ("content", " " + (m.get("content") or ""))]
        if role == "assistant":
            pieces.append(("eos", ""))
    pieces.append(("template", f"{'' if pieces[-1][0] == 'eos' else ' '}ASSISTANT:"))
    return pieces


def vicuna_text(messages: list[dict], eos_token: str = "</s>") -> str:
    """The conversation as FastChat renders it (without the BOS the tokenizer adds)."""
    return "".join(eos_token if kind == "eos" else text for kind, text in vicuna_pieces(messages))


def vicuna_prompt_ids(tokenizer, messages: list[dict], allow_special: bool = False) -> list[int]:
    """BOS + the conversation, tokenized as vicuna saw it in training: FastChat called the (legacy, slow)
    LlamaTokenizer on the whole text, which tokenizes the text between special tokens segment by segment,
    each with sentencepiece's word-start marker, so "</s>USER:" is `</s>`, "▁USER", ":". llama.cpp's own
    tokenizer does the same; transformers 5's fast tokenizer would give "US", "ER" there.

    vicuna's turns are marked by plain text ("USER:", "ASSISTANT:") and by `</s>`. Unless allow_special is
    on, what clients wrote is tokenized with special strings as plain characters and role markers spelled one
    character at a time, so the exact token sequences that open a turn only ever come from the template."""
    if getattr(tokenizer, "eos_token", None) is None:
        raise ValueError("this tokenizer has neither a chat template nor an EOS token: send a raw prompt instead")
    if allow_special:  # the client's text is parsed like the template's: special strings are real
        return segmentwise_ids(tokenizer, vicuna_text(messages, tokenizer.eos_token))
    return vicuna_piecewise_ids(tokenizer, vicuna_pieces(messages))


def segmentwise_ids(tokenizer, text: str) -> list[int]:
    """BOS + `text` tokenized as the legacy LlamaTokenizer did: special strings become their ids, and the
    text between them is tokenized segment by segment (each with sentencepiece's word-start marker)."""
    specials = sorted(set(special_strings(tokenizer)), key=len, reverse=True)
    out, pos = bos_prefix(tokenizer), 0
    if specials:
        for m in re.finditer("|".join(re.escape(s) for s in specials), text):
            out += _encode(tokenizer, text[pos : m.start()], split_special=False)
            out.append(tokenizer.convert_tokens_to_ids(m.group()))
            pos = m.end()
    return out + _encode(tokenizer, text[pos:], split_special=False)


def _forgery(tokenizer) -> re.Pattern:
    """What a client may not write as such: the tokenizer's special strings and vicuna's role markers."""
    marks = special_strings(tokenizer) + [f"{role}:" for role in VICUNA_ROLES.values()]
    return re.compile("|".join(re.escape(m) for m in sorted(set(marks), key=len, reverse=True)))


def vicuna_piecewise_ids(tokenizer, pieces: list[tuple[str, str]]) -> list[int]:
    """Each piece tokenized on its own: our text as usual, client content with special strings and role
    markers as plain characters, our own `</s>` as the EOS id. Pieces begin at word boundaries or right
    after an EOS, where the word-start marker belongs anyway: the ids equal the segment-wise tokenization
    of the whole text (checked in tests against llama.cpp's tokenizer)."""
    out = bos_prefix(tokenizer)
    for kind, text in pieces:
        if kind == "eos":
            out.append(tokenizer.eos_token_id)
        elif kind == "content":
            out += _content_ids(tokenizer, text)
        else:
            out += _encode(tokenizer, text, split_special=False)
    return out


def _content_ids(tokenizer, text: str) -> list[int]:
    """A client's text, starting at a word boundary, with special strings and role markers spelled out."""
    out, pos = [], 0
    for m in _forgery(tokenizer).finditer(text):
        out += _encode(tokenizer, text[pos : m.start()], split_special=True) if pos == 0 else \
            _continuation(tokenizer, text[pos : m.start()])
        for ch in m.group():
            out += _continuation(tokenizer, ch)
        pos = m.end()
    rest = text[pos:]
    return out + (_encode(tokenizer, rest, split_special=True) if pos == 0 else _continuation(tokenizer, rest))


def _continuation(tokenizer, text: str) -> list[int]:
    """`text` tokenized as it would be in the middle of a longer text: behind an EOS token, which stops
    sentencepiece from adding its word-start marker. `text` must hold no special-token string."""
    if not text:
        return []
    return _encode(tokenizer, tokenizer.eos_token + text, split_special=False)[1:]


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when `tokenizer(text)` puts one in front, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = _ids(tokenizer("a"))
    return [bos] if bos is not None and ids and ids[0] == bos else []
