#!/usr/bin/env python3
"""A stand-in for llama-server's streamed /v1/chat/completions (standard library only, no model): takes
llama-server's command line, answers /health, and streams `max_tokens` words per answer with llama-server's
final `usage` and `timings`. A token is a word; with `cache_prompt` true the prompt's common prefix with the
previous prompt counts as reused (`timings.cache_n`), as llama-server's slot cache does.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_last_prompt: list[str] = []


def prompt_words(messages: list[dict]) -> list[str]:
    return [w for m in messages for w in [f"<{m['role']}>", *m["content"].split()]] + ["<assistant>"]


def answer(body: dict) -> list[bytes]:
    global _last_prompt
    prompt = prompt_words(body["messages"])
    cached = 0
    if body.get("cache_prompt"):
        while cached < min(len(prompt), len(_last_prompt)) and prompt[cached] == _last_prompt[cached]:
            cached += 1
    _last_prompt = prompt
    n = body["max_tokens"]
    words = [f"w{len(prompt)}-{i}" for i in range(n)]
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}}]} for i, w in enumerate(words)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n},
                   "timings": {"cache_n": cached, "prompt_n": len(prompt) - cached, "predicted_n": n}})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in answer(body):
            self.wfile.write(piece)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-m", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args, _ = p.parse_known_args()  # -np, -c, --jinja, -t ...: llama-server's, nothing to do here
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
