"""A chat panel for notebooks: history, streamed replies, a stop button, speculation statistics.

It talks to any nbkit server over HTTP (`/v1/chat/completions` with `stream: true`), so it works
against the server of this notebook, a tunnel URL, or another machine.

Why no background thread: widgets updated from another thread may never refresh in Colab. A click
schedules `asend()` as a task on the kernel's own event loop (the main thread); between chunks the
kernel handles other messages, which is how a click on Stop gets through while a reply streams.
`send()` is the same loop, blocking, for cells and tests. Both feed every SSE line to `_feed`, which
is where the widget state changes, so the tests of `send()` cover what a click does.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from dataclasses import dataclass, field

import httpx
import ipywidgets as widgets

from ..client import DONE, auth_headers, merge_tool_calls, sse_data, tool_call_text

USER_STYLE = "background:#e8f0fe;border-radius:8px;padding:6px 10px;margin:4px 0 4px 15%;white-space:pre-wrap"
BOT_STYLE = "background:#f1f3f4;border-radius:8px;padding:6px 10px;margin:4px 15% 4px 0;white-space:pre-wrap"
STATS_STYLE = "color:#5f6368;font-size:85%;margin:0 15% 6px 0"


@dataclass
class Reply:
    """One assistant reply and what it cost."""

    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's form, when the model called functions
    chunks: int = 0
    completion_tokens: int | None = None
    steps: int | None = None  # decoding steps (tree verifications), when the server reports them
    mean_accepted: float | None = None  # tokens per step; 1.0 = no gain from speculation
    finish_reason: str | None = None  # "stop" | "length" | ... | "stopped" (our Stop button) | "error"
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first (what Medusa speeds up)."""
        if self.first_token_at is None or self.last_token_at is None or self.tokens < 2:
            return None
        elapsed = self.last_token_at - self.first_token_at
        return (self.tokens - 1) / elapsed if elapsed > 0 else None

    @property
    def shown(self) -> str:
        """The text, then its calls as people read them."""
        return "\n".join(filter(None, [self.text, tool_call_text(self.tool_calls)]))

    def __repr__(self) -> str:  # a cell ending with send() shows the reply and its numbers
        return f"{self.shown.strip()}\n[{self.stats()}]"

    def stats(self) -> str:
        parts = [f"{self.tokens} tokens"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.mean_accepted is not None:
            parts.append(f"{self.mean_accepted:.2f} tokens/step")
        if self.time_to_first_token is not None:
            parts.append(f"first token {self.time_to_first_token:.2f} s")
        if self.finish_reason:
            parts.append(self.finish_reason)
        if self.error:
            parts.append(f"error: {self.error}")
        return " · ".join(parts)


def _speculation_stats(obj: dict) -> tuple[int | None, float | None]:
    """(steps, mean accepted) from a final chunk's usage / details / nbkit fields, whichever the server sent."""
    for source in (obj.get("usage"), obj.get("details"), obj.get("nbkit"), obj):
        if isinstance(source, dict) and ("mean_accepted" in source or "steps" in source):
            steps = source.get("steps")
            mean = source.get("mean_accepted")
            if mean is None and steps and source.get("completion_tokens"):
                mean = source["completion_tokens"] / steps
            return steps, mean
    return None, None


_METRIC = re.compile(r"^(nbkit_steps_total|nbkit_generated_tokens_total)\s+([0-9.eE+-]+)$", re.MULTILINE)


class ChatPanel:
    """`ChatPanel(url, api_key)`; display it (it is the last expression of a cell) or call `send(text)`."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, system: str | None = None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.model = model
        self.system = system
        self.timeout = timeout
        self._headers = auth_headers(api_key, ngrok=True)  # the URL may be an ngrok tunnel
        self.messages: list[dict] = []  # the conversation sent to the server
        self.replies: list[Reply] = []
        self._stop_requested = False
        self._task: asyncio.Task | None = None
        self.busy = False

        self.history = widgets.VBox([], layout=widgets.Layout(max_height="480px", overflow="auto"))
        self.prompt = widgets.Textarea(placeholder="Ask something…", layout=widgets.Layout(width="100%", height="70px"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.clear_button = widgets.Button(description="Clear", icon="trash")
        self.temperature = widgets.FloatSlider(value=temperature, min=0.0, max=1.5, step=0.05,
                                               description="temperature", readout_format=".2f")
        self.max_tokens = widgets.IntSlider(value=max_tokens, min=8, max=2048, step=8, description="max tokens")
        self.json_mode = widgets.Checkbox(value=False, description="JSON", indent=False)  # response_format
        self.status = widgets.HTML(value=f"<span style='{STATS_STYLE}'>{html.escape(self.url)}</span>")
        self.send_button.on_click(self._on_send_click)
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.widget = widgets.VBox([
            self.history, self.prompt,
            widgets.HBox([self.send_button, self.stop_button, self.clear_button]),
            widgets.HBox([self.temperature, self.max_tokens, self.json_mode]), self.status,
        ])

    # --- what the buttons do -------------------------------------------------------------------
    def _on_send_click(self, _button=None) -> None:
        if self.busy or not self.prompt.value.strip():
            return
        try:
            loop = asyncio.get_running_loop()  # the kernel's loop: stream without blocking it
        except RuntimeError:
            self.send()
            return
        text = self.prompt.value
        self._task = loop.create_task(self._astream(text, *self._begin(text)))  # Send greys out right now

    def stop(self) -> None:
        """Stop the reply that is streaming; the text so far stays in the history."""
        if self.busy:
            self._stop_requested = True

    def clear(self) -> None:
        if not self.busy:
            self.messages.clear()
            self.replies.clear()
            self.history.children = ()

    # --- one reply -------------------------------------------------------------------------------
    def _request(self, text: str) -> dict:
        messages = ([{"role": "system", "content": self.system}] if self.system and not self.messages else [])
        self.messages += messages + [{"role": "user", "content": text}]
        body = {"messages": list(self.messages), "stream": True, "stream_options": {"include_usage": True},
                "temperature": float(self.temperature.value), "max_tokens": int(self.max_tokens.value)}
        if self.model:
            body["model"] = self.model
        if self.json_mode.value:  # the reply is one JSON object
            body["response_format"] = {"type": "json_object"}
        return body

    def _begin(self, text: str) -> tuple[Reply, widgets.HTML, widgets.HTML]:
        self.busy, self._stop_requested = True, False
        self.prompt.value = ""
        self.send_button.disabled, self.stop_button.disabled = True, False
        bubble = widgets.HTML(value=self._bubble("…", BOT_STYLE))
        stats = widgets.HTML(value="")
        self.history.children = (*self.history.children, widgets.HTML(value=self._bubble(text, USER_STYLE)),
                                 bubble, stats)
        reply = Reply()
        self.replies.append(reply)
        self.status.value = f"<span style='{STATS_STYLE}'>generating…</span>"
        return reply, bubble, stats

    def _feed(self, reply: Reply, bubble: widgets.HTML, line: str) -> bool:
        """Apply one SSE line to the reply and its widgets; True when the stream is over."""
        try:
            chunk = sse_data(line)
        except ValueError:
            return False
        if chunk is None:
            return False  # blank separators, comments (": ping"), event names
        if chunk == DONE:
            return True
        if "error" in chunk:
            err = chunk["error"]
            reply.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            reply.finish_reason = "error"
            return True
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            piece, calls = delta.get("content") or "", delta.get("tool_calls") or []
            if piece or calls:
                now = time.perf_counter()
                reply.first_token_at = reply.first_token_at or now
                reply.last_token_at = now
                reply.text += piece
                reply.chunks += 1
                merge_tool_calls(reply.tool_calls, calls)
                bubble.value = self._bubble(reply.shown, BOT_STYLE)
            if choice.get("finish_reason"):
                reply.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            reply.completion_tokens = chunk["usage"].get("completion_tokens", reply.completion_tokens)
        steps, mean = _speculation_stats(chunk)
        if mean is not None:
            reply.steps, reply.mean_accepted = steps, mean
        return False

    def _end(self, reply: Reply, bubble: widgets.HTML, stats: widgets.HTML, counters: tuple | None) -> Reply:
        if self._stop_requested and reply.finish_reason is None:
            reply.finish_reason = "stopped"
        if reply.mean_accepted is None and counters is not None:
            reply.steps, reply.mean_accepted = self._from_counters(counters)
        if reply.text or reply.tool_calls:
            calls = {"tool_calls": reply.tool_calls} if reply.tool_calls else {}
            self.messages.append({"role": "assistant", "content": reply.text or None, **calls})
        else:  # nothing came back: forget the question (and a system prompt sent with it) so a retry is clean
            while self.messages and self.messages[-1]["role"] != "assistant":
                self.messages.pop()
        bubble.value = self._bubble(reply.shown, BOT_STYLE) if reply.shown else self._bubble(
            f"[{reply.error or reply.finish_reason or 'no reply'}]", BOT_STYLE)
        stats.value = f"<div style='{STATS_STYLE}'>{html.escape(reply.stats())}</div>"
        self.status.value = f"<span style='{STATS_STYLE}'>last reply: {html.escape(reply.stats())}</span>"
        self.busy, self._stop_requested = False, False
        self.send_button.disabled, self.stop_button.disabled = False, True
        return reply

    @staticmethod
    def _bubble(text: str, style: str) -> str:
        return f"<div style='{style}'>{html.escape(text)}</div>"

    @staticmethod
    def _error_text(status: int, body: bytes) -> str:
        try:
            err = json.loads(body).get("error")
            message = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            message = None
        return f"HTTP {status}: {message or body[:200].decode(errors='replace')}"

    # Server-wide counters, the fallback when a stream carries no speculation statistics: exact while
    # this panel is the only client (the usual notebook case).
    def _counters(self, client: httpx.Client) -> tuple[float, float] | None:
        try:
            return self._parse_counters(client.get(f"{self.url}/metrics", headers=self._headers, timeout=10).text)
        except httpx.HTTPError:
            return None

    async def _acounters(self, client: httpx.AsyncClient) -> tuple[float, float] | None:
        try:
            return self._parse_counters((await client.get(f"{self.url}/metrics", headers=self._headers,
                                                          timeout=10)).text)
        except httpx.HTTPError:
            return None

    @staticmethod
    def _parse_counters(text: str) -> tuple[float, float] | None:
        found = dict(_METRIC.findall(text))
        if len(found) < 2:
            return None
        return float(found["nbkit_steps_total"]), float(found["nbkit_generated_tokens_total"])

    def _from_counters(self, counters: tuple) -> tuple[int | None, float | None]:
        before, after = counters
        if before is None or after is None:
            return None, None
        steps, tokens = after[0] - before[0], after[1] - before[1]
        # The first token comes from the prefill, not from a decoding step.
        return (int(steps), (tokens - 1) / steps) if steps > 0 else (None, None)

    def send(self, text: str | None = None) -> Reply:
        """Send `text` (or what is typed) and stream the reply into the panel; blocks until it is done."""
        text = text if text is not None else self.prompt.value
        return self._stream(text, *self._begin(text))

    def _stream(self, text: str, reply: Reply, bubble: widgets.HTML, stats: widgets.HTML) -> Reply:
        counters = None
        try:
            with httpx.Client(timeout=self.timeout) as client:
                before = self._counters(client)
                body = self._request(text)
                with client.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                   headers=self._headers) as response:
                    if response.status_code != 200:
                        reply.error, reply.finish_reason = self._error_text(response.status_code,
                                                                            response.read()), "error"
                    else:
                        for line in response.iter_lines():
                            if self._stop_requested or self._feed(reply, bubble, line):
                                break
                if before is not None and reply.mean_accepted is None:
                    counters = (before, self._counters(client))
        except httpx.HTTPError as err:
            reply.error, reply.finish_reason = f"{type(err).__name__}: {err}", "error"
        return self._end(reply, bubble, stats, counters)

    async def asend(self, text: str | None = None) -> Reply:
        """`send()` for the event loop: awaits between chunks so a Stop click is handled mid-reply."""
        text = text if text is not None else self.prompt.value
        return await self._astream(text, *self._begin(text))

    async def _astream(self, text: str, reply: Reply, bubble: widgets.HTML, stats: widgets.HTML) -> Reply:
        counters = None
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                before = await self._acounters(client)
                body = self._request(text)
                async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                         headers=self._headers) as response:
                    if response.status_code != 200:
                        reply.error, reply.finish_reason = self._error_text(response.status_code,
                                                                            await response.aread()), "error"
                    else:
                        async for line in response.aiter_lines():
                            if self._stop_requested or self._feed(reply, bubble, line):
                                break
                if before is not None and reply.mean_accepted is None:
                    counters = (before, await self._acounters(client))
        except httpx.HTTPError as err:
            reply.error, reply.finish_reason = f"{type(err).__name__}: {err}", "error"
        return self._end(reply, bubble, stats, counters)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def chat_panel(target, api_key: str | None = None, **kwargs) -> ChatPanel:
    """A chat panel for a server URL, a server handle (`.url`) or a tunnel (`.local_url`, `.api_key`).

    The panel's requests leave from the kernel, so a tunnel is reached through its local URL (Colab's
    proxy URL works only in the browser)."""
    api_key = api_key or getattr(target, "api_key", None)
    url = getattr(target, "local_url", None) or getattr(target, "url", target)
    return ChatPanel(str(url), api_key=api_key, model=kwargs.pop("model", getattr(target, "model", None)), **kwargs)


def show_images(folder) -> list:
    """Display the PNG files of a folder (the benchmark's plots), in name order; returns their paths."""
    from pathlib import Path

    from IPython.display import Image, Markdown, display

    files = sorted(Path(folder).glob("*.png"))
    if not files:
        print(f"no PNG files in {folder}")
    for file in files:
        display(Markdown(f"**{file.stem}**"), Image(filename=str(file)))
    return files


def child_env() -> dict[str, str]:
    """This process's environment, with the folder that holds the imported nbkit first on PYTHONPATH.

    In Colab nbkit is on the kernel's sys.path only (the clone cell puts the checkout there): a child
    `python -m nbkit` would not find it otherwise."""
    import os
    from pathlib import Path

    import nbkit

    root = str(Path(nbkit.__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, *rest])}


def run_benchmark(prepared=None, args: str = "", out: str = "bench") -> dict:
    """Run `python -m nbkit bench` (its output streams here), then show its plots; returns bench.json.

    `prepared` (hub.prepare) chooses the engine, model and heads; `args` are more bench options."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    if hasattr(prepared, "wait_for_engine"):
        prepared.wait_for_engine()  # the llama.cpp build may still run in the background
    cmd = [sys.executable, "-m", "nbkit", "bench", *shlex.split(prepared.cli_args() if prepared else ""),
           *shlex.split(args), "--out", str(out)]
    print("$ python -m nbkit bench " + " ".join(shlex.quote(a) for a in cmd[4:]), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=child_env()) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nbkit bench failed (exit {proc.returncode}); its output is above")
    show_images(out)
    return json.loads((Path(out) / "bench.json").read_text())
