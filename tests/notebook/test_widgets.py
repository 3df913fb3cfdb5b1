"""The chat panel against a small fake SSE server on 127.0.0.1: the widget state after a streamed
reply, after Stop (sync and through the button on an event loop), and after errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nbkit.notebook.widgets import ChatPanel, chat_panel

WORDS = ["Medusa", " adds", " heads", " that", " guess", " the", " next", " tokens", "."]


class FakeServer:
    """/v1/chat/completions streams WORDS (or `n_chunks` words) OpenAI-style; /metrics counts steps."""

    def __init__(self, delay=0.0, n_chunks=None, stats_in_usage=True, status=200, deltas=None):
        self.requests, self.disconnected = [], threading.Event()
        self.steps = self.tokens = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = (f"# TYPE nbkit_steps counter\nnbkit_steps_total {float(fake.steps)}\n"
                        f"nbkit_generated_tokens_total {float(fake.tokens)}\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                if status != 200:
                    data = json.dumps({"error": {"message": "invalid API key", "type": "auth"}}).encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                words = WORDS if n_chunks is None else [f" w{i}" for i in range(n_chunks)]
                streamed = deltas or [{"content": word} for word in words]
                try:
                    self.wfile.write(b": ping\n\n")
                    for i, delta in enumerate(streamed):
                        chunk = {"object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        fake.tokens += 1
                        fake.steps += i % 2 == 1  # the prefill gives token 0, then 2 tokens per step
                        time.sleep(delay)
                    final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if deltas else "stop"}]}
                    self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
                    usage = {"prompt_tokens": 12, "completion_tokens": len(streamed), "total_tokens": 12 + len(streamed)}
                    if stats_in_usage:
                        usage.update(steps=4, mean_accepted=2.25)
                    self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    fake.disconnected.set()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        servers.append(FakeServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_streamed_reply_fills_history_and_stats(fake):
    server = fake(delay=0.01)
    panel = chat_panel(server.url, api_key="k-123", system="Be brief.")
    panel.temperature.value = 0.7
    panel.prompt.value = "What is Medusa?"
    seen = []
    feed = panel._feed
    panel._feed = lambda reply, bubble, line: (seen.append(bubble.value), feed(reply, bubble, line))[1]
    reply = panel.send()
    # The request: chat history, temperature from the slider, the key as a Bearer token.
    req = server.requests[0]
    assert req["auth"] == "Bearer k-123"
    assert req["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is Medusa?"}]
    assert req["body"]["temperature"] == 0.7 and req["body"]["stream"] is True
    # Streaming: the bubble grew chunk by chunk.
    assert any("Medusa adds heads" in v and "tokens." not in v for v in seen)
    # Final state.
    assert reply.text == "".join(WORDS) and reply.finish_reason == "stop"
    assert (reply.completion_tokens, reply.steps, reply.mean_accepted) == (9, 4, 2.25)
    assert reply.tokens_per_s > 0 and reply.time_to_first_token is not None
    assert panel.messages[-1] == {"role": "assistant", "content": "".join(WORDS)}
    user, bot, stats = panel.history.children
    assert "What is Medusa?" in user.value and "Medusa adds heads that guess the next tokens." in bot.value
    assert "9 tokens" in stats.value and "tok/s" in stats.value and "2.25 tokens/step" in stats.value
    assert panel.prompt.value == "" and not panel.busy
    assert not panel.send_button.disabled and panel.stop_button.disabled
    # A second turn carries the history.
    panel.send("And why is it fast?")
    assert [m["role"] for m in server.requests[1]["body"]["messages"]] == ["system", "user", "assistant", "user"]
    assert len(panel.history.children) == 6


def test_json_toggle_asks_for_an_object_and_tool_calls_are_shown_readably(fake):
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    pieces = ['{"city"', ': "Paris",', ' "unit": "celsius"}']
    server = fake(deltas=[{"role": "assistant", "tool_calls": [call]}] + [
        {"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces])
    panel = chat_panel(server.url)
    panel.send("Weather?")
    assert "response_format" not in server.requests[0]["body"]  # off by default: the model writes freely
    bot = panel.history.children[1].value
    assert "→ get_weather({" in bot and "&quot;city&quot;: &quot;Paris&quot;,\n" in bot  # pretty, escaped JSON
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    assert json.loads(panel.messages[-1]["tool_calls"][0]["function"]["arguments"]) == json.loads(arguments)
    assert panel.messages[-1]["content"] is None and panel.replies[-1].finish_reason == "tool_calls"
    panel.json_mode.value = True
    panel.send("As JSON")
    assert server.requests[1]["body"]["response_format"] == {"type": "json_object"}
    assert server.requests[1]["body"]["messages"][1]["tool_calls"][0]["id"] == "call_1"  # history as OpenAI's


def test_stop_keeps_the_partial_reply_and_closes_the_stream(fake):
    server = fake(delay=0.02, n_chunks=200)
    panel = ChatPanel(server.url)
    feed = panel._feed

    def feed_then_click_stop(reply, bubble, line):
        done = feed(reply, bubble, line)
        if reply.chunks == 3:
            assert not panel.stop_button.disabled and panel.send_button.disabled  # state while streaming
            panel.stop_button.click()
        return done

    panel._feed = feed_then_click_stop
    start = time.perf_counter()
    reply = panel.send("count")
    assert time.perf_counter() - start < 2.0  # did not wait for the 200 chunks
    assert reply.text == " w0 w1 w2" and reply.finish_reason == "stopped"
    assert "stopped" in panel.history.children[-1].value and "w2" in panel.history.children[-2].value
    assert panel.messages[-1] == {"role": "assistant", "content": " w0 w1 w2"}
    assert not panel.busy and panel.stop_button.disabled and not panel.send_button.disabled
    assert server.disconnected.wait(5)  # the server saw the client go (and can free the slot)


def test_stop_button_on_the_event_loop(fake):
    """What a click does in a kernel: the reply streams as a task; the Stop click lands between chunks."""
    server = fake(delay=0.02, n_chunks=200)
    panel = ChatPanel(server.url)

    async def scenario():
        panel.prompt.value = "count"
        panel.send_button.click()  # schedules asend() on this loop and returns at once
        assert panel.busy and panel._task is not None
        while not panel.replies or panel.replies[-1].chunks < 3:
            await asyncio.sleep(0.005)
        panel.stop_button.click()
        return await panel._task

    reply = asyncio.run(scenario())
    assert reply.finish_reason == "stopped" and 3 <= reply.chunks < 20
    assert reply.text.startswith(" w0 w1 w2") and not panel.busy and panel.stop_button.disabled
    assert server.disconnected.wait(5)


def test_click_without_a_loop_streams_synchronously(fake):
    server = fake()
    panel = ChatPanel(server.url)
    panel.prompt.value = "hi"
    panel.send_button.click()
    assert panel.replies[-1].text == "".join(WORDS)


def test_speculation_stats_from_metrics_when_the_stream_has_none(fake):
    server = fake(stats_in_usage=False)
    reply = ChatPanel(server.url).send("hi")
    assert reply.steps == 4 and reply.mean_accepted == 2.0  # 1 + 8 tokens in 4 steps, from /metrics deltas


def test_errors_are_shown_and_the_question_is_forgotten(fake):
    server = fake(status=401)
    panel = ChatPanel(server.url, api_key="wrong")
    reply = panel.send("hi")
    assert reply.finish_reason == "error" and "HTTP 401: invalid API key" in reply.error
    assert "invalid API key" in panel.history.children[-2].value
    assert panel.messages == [] and not panel.busy
    down = ChatPanel("http://127.0.0.1:9").send("hi")
    assert down.finish_reason == "error" and "ConnectError" in down.error
