"""`python -m nbkit serve`: the server in the foreground; Ctrl-C or SIGTERM stops it gracefully."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (original, TGI and OpenAI APIs, chat page)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: embedded SmolLM2)")
    p.add_argument("--heads", default=None, help="Medusa heads folder/file, 'embedded' or 'none'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--engine", choices=("auto", "torch", "llamacpp"), default="auto",
                   help="auto = the fastest for this machine and model: llama.cpp on a CPU with a GGUF (the "
                        "embedded model is one), torch on a GPU or for a transformers folder; the start-up log "
                        "and GET /info say which and why")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (set an API key)")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this Bearer key (repeatable; visible to other users in `ps`: prefer "
                        "--api-key-file or $NBKIT_API_KEY)")
    p.add_argument("--api-key-file", default=None,
                   help="require the keys in this file (one per line); default: $NBKIT_API_KEY, if set")
    p.add_argument("--rate-limit", type=float, default=600.0,
                   help="generation requests per minute per key (0 = no limit)")
    p.add_argument("--cors-origin", action="append", default=None,
                   help="let pages on this origin call the API from a browser (repeatable; default: any origin, "
                        "'*', as llama-server and vLLM: the key is a header, not a cookie; 'none' = no CORS)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch (then 429)")
    p.add_argument("--speculation", default="adaptive", help="adaptive, off, or a fixed tree name")
    p.add_argument("--llama-mode", choices=("auto", "exact", "fast"), default="auto",
                   help="llama.cpp engine: exact = greedy output independent of the tree and of the batch "
                        "(measured cost: README); fast = no such guarantee; auto = exact on a CPU, fast with "
                        "GPU offload (exact's ubatch caps are specific to ggml's CPU kernels)")
    p.add_argument("--kv-budget-gib", type=float, default=None,
                   help="KV cache budget (GiB, the notebook's plan gives it): allocated once, and requests that do "
                        "not fit are refused; default: no budget, the cache grows on demand")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt in full (default: a prompt that starts with tokens whose KV is still "
                        "kept, such as a conversation's previous turn, reuses it)")
    p.add_argument("--calibrate", choices=("while-serving", "at-start"), default="while-serving",
                   help="when a first start on this machine measures the forward costs that price Medusa trees: "
                        "while-serving = healthy at once, plain decoding until idle time has measured them; "
                        "at-start = before reporting healthy (a later start reuses the cached figures either way)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between the engine's log lines while it has work (0 = none); every finished "
                        "request logs one line at info")
    p.set_defaults(func=cmd_serve)


def read_keys(given: list[str] | None, key_file: str | None) -> list[str] | None:
    """The keys from --api-key, --api-key-file (one per line, # comments) and $NBKIT_API_KEY, in that order."""
    keys = list(given or [])
    if key_file:
        try:
            lines = open(key_file, encoding="utf-8").read().splitlines()
        except OSError as err:
            raise OSError(f"cannot read the API key file {key_file}: {err.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"the API key file {key_file} holds no key")
    if not keys and os.environ.get("NBKIT_API_KEY"):
        keys = [os.environ["NBKIT_API_KEY"]]
    return keys or None


def cors_origins(given: list[str] | None) -> list[str]:
    """--cors-origin values as Settings.cors_origins: none given = any origin; 'none' = no CORS headers."""
    if not given:
        return ["*"]
    return [] if given == ["none"] else [o.rstrip("/") for o in given]


LLAMA_MODES = {"auto": None, "exact": True, "fast": False}  # --llama-mode -> the runner's `exact`


def llama_kwargs(args, engine: str | None = None) -> dict:
    """The llama.cpp engine's options (the torch engine takes none of them); `engine`: the one chosen for
    --engine auto."""
    return {"exact": LLAMA_MODES[args.llama_mode]} if (engine or args.engine) == "llamacpp" else {}


def kv_budget_bytes(args) -> int | None:
    return None if args.kv_budget_gib is None else int(args.kv_budget_gib * 1024**3)


def cmd_serve(args) -> int:
    from ..engine.choice import choose_engine
    from .app import Settings
    from .launch import start_server
    from .request_log import show_logs

    try:
        keys = read_keys(args.api_key, args.api_key_file)
        settings = Settings(api_key=keys, rate_limit=args.rate_limit or None, max_new_tokens=args.max_new_tokens,
                            cors_origins=cors_origins(args.cors_origin), log_interval=args.log_interval)
        settings.keys  # noqa: B018 -- a short key is refused before the model loads
    except (OSError, ValueError) as err:
        print(f"nbkit serve: {err}", file=sys.stderr)
        return 2
    show_logs(args.log_level)
    stop = threading.Event()

    def on_signal(signum, frame):
        # A second Ctrl-C / SIGTERM kills at once; the first one stops gracefully (also while loading).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if stop.is_set() or handle is None:
            raise KeyboardInterrupt
        stop.set()

    handle = None
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        choice = choose_engine(args.engine, args.model, args.device)
        print(f"nbkit serve: loading the model (engine {choice.name}: {choice.reason}) ...", file=sys.stderr,
              flush=True)
        handle = start_server(model=args.model, heads=args.heads, engine=choice, device=args.device,
                              host=args.host, port=args.port, api_key=keys, max_batch=args.max_batch,
                              max_queue=args.max_queue, speculation=args.speculation, settings=settings,
                              log_level=args.log_level, kv_budget_bytes=kv_budget_bytes(args),
                              prefix_cache=args.prefix_cache, calibrate=args.calibrate,
                              **llama_kwargs(args, choice.name))
    except KeyboardInterrupt:
        print("nbkit serve: interrupted while loading", file=sys.stderr)
        return 130
    print(f"nbkit serve: {handle.url}  (model {handle.app.state.service.model_id}, "
          f"API key {'required' if keys else 'not required'})", flush=True)
    while not stop.wait(0.5):
        if not handle.running:
            print("nbkit serve: the HTTP server stopped", file=sys.stderr)
            return 1
    print("nbkit serve: stopping ...", file=sys.stderr, flush=True)
    handle.stop()
    print("nbkit serve: stopped", file=sys.stderr, flush=True)
    return 0
