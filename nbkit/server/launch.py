"""Run the server from a notebook or a script: uvicorn in a daemon thread, one server at a time.

    handle = start_server()            # the embedded model on http://127.0.0.1:8000
    handle.url, handle.stop()

We bind the listening socket ourselves, so a taken port is a clear OSError at once (uvicorn would
call sys.exit inside its thread), and port=0 gives a free port. The HTTP server is up before the
model loads: /health answers 503 "loading" meanwhile, then 200. Calling start_server again (a
re-run notebook cell) stops the previous server first instead of leaking it.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.choice import EngineChoice

log = logging.getLogger("nbkit.server")

_current: ServerHandle | None = None
_lock = threading.Lock()


@dataclass(eq=False)  # compared by identity: it refers to its tunnel, which refers back
class ServerHandle:
    url: str
    host: str
    port: int
    app: object = field(repr=False)
    engine: object = field(repr=False)
    owns_engine: bool = field(repr=False)
    _server: object = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _sock: socket.socket = field(repr=False)
    tunnel: object = field(default=None, repr=False)  # the tunnel that publishes this server: closed with it

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def set_api_key(self, key: str | list[str]) -> None:
        """Require `key` (or keys) from now on instead of the current ones (rotation); the old ones stop working."""
        from .security import redact_logs

        settings = self.app.state.service.settings
        old = settings.api_key
        settings.api_key = key
        try:
            keys = settings.keys
        except ValueError:
            settings.api_key = old
            raise
        redact_logs(keys)

    def stop(self, grace: float = 5.0, timeout: float = 10.0) -> None:
        """Stop serving: refuse new requests, let in-flight ones finish for up to `grace` seconds, cancel
        the rest, then stop uvicorn and (if the launcher created or started it) the engine."""
        global _current
        if self.tunnel is not None:  # first: nothing public may point at this port once it stops serving
            self.tunnel.close()
            self.tunnel = None
        svc = self.app.state.service
        svc.stopping = True
        deadline = time.monotonic() + grace
        while svc.inflight and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        svc.cancel_all()
        if self.owns_engine and self.engine is not None:
            self.engine.stop(timeout)  # finishes whatever is left as cancelled: every stream gets its end
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        with _lock:
            if _current is self:
                _current = None
        if self.owns_engine and self.engine is not None:
            # Drop our references so the weights can be freed before a re-run cell loads the next model
            # (the old handle stays referenced by the notebook's variable until start_server returns).
            svc.engine = svc.metrics.engine = self.engine = None
            _free_memory()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    engine_or_none=None, /, *, model=None, heads=None, engine: str | EngineChoice = "torch", device: str | None = None,
    host: str = "127.0.0.1", port: int = 8000, api_key: str | list[str] | None = None,
    max_batch: int = 16, speculation: str = "adaptive", max_queue: int = 64, settings=None,
    start_timeout: float = 30.0, log_level: str = "warning", kv_budget_bytes: int | None = None, **engine_kwargs,
) -> ServerHandle:
    """Serve `engine_or_none` (an Engine, started here if needed), or load `model`/`heads` with the
    `engine` backend ("torch", "llamacpp", "auto": the fastest for this device and model, or an EngineChoice
    made by the caller). port=0 picks a free port. Returns once requests are served.
    `settings` (nbkit.server.app.Settings) sets the limits; `api_key` overrides its key; kv_budget_bytes: the plan's.
    """
    global _current
    from ..engine.loader import load_engine
    from .app import Settings, create_app

    settings = dataclasses.replace(settings or Settings())  # a copy: the caller's object stays as it was
    if api_key is not None:
        settings.api_key = api_key
    if engine_or_none is None:
        engine = _choose(engine, model, device, settings)
    settings.keys  # noqa: B018 -- validate the keys before anything starts

    _close_unkeyed_tunnel(port, settings.keys)
    with _lock:
        previous = _current
    owns = engine_or_none is None
    if previous is not None:
        keep = previous.engine is engine_or_none and engine_or_none is not None
        if keep and previous.owns_engine:
            owns = True  # the engine we are handed back was started by the launcher: stop it with this server
        previous.owns_engine = previous.owns_engine and not keep
        previous.stop()

    sock = _bind(host, port)
    app = create_app(None, settings)
    server, thread = _serve(app, sock, log_level, start_timeout)
    bound = sock.getsockname()[1]
    url = f"http://{_url_host(host)}:{bound}"
    handle = ServerHandle(url, host, bound, app, None, owns, server, thread, sock)
    with _lock:
        _current = handle
    try:
        if engine_or_none is None:
            engine_or_none = load_engine(engine, model=model, heads=heads, device=device, max_batch=max_batch,
                                         speculation=speculation, max_queue=max_queue,
                                         kv_budget_bytes=kv_budget_bytes, **engine_kwargs)
        handle.engine = engine_or_none
        if not engine_or_none.alive:
            if engine_or_none.dead:
                raise RuntimeError(f"the engine is dead: {engine_or_none.dead}")
            engine_or_none.start()
            owns = True
        handle.owns_engine = owns
        app.state.service.attach(engine_or_none)
    except BaseException:
        handle.stop(grace=0)
        raise
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.keys:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    return handle


def _choose(engine: str | EngineChoice, model, device: str | None, settings) -> str:
    """The engine that loads `model` (engine/choice.py for "auto"), kept with its reason in `settings`."""
    from ..engine.choice import EngineChoice, choose_engine  # noqa: F811 (the annotation's name, at run time)

    choice = engine if isinstance(engine, EngineChoice) else choose_engine(engine, model, device)
    settings.engine_name, settings.engine_reason = choice.name, choice.reason
    log.info("engine: %s (%s)", choice.name, choice.reason)
    return choice.name


def _close_unkeyed_tunnel(port: int, keys: list[str]) -> None:
    """A public tunnel to `port` stays only in front of a server that requires a key: else it closes first."""
    tunnels = sys.modules.get("nbkit.notebook.tunnel")  # not imported: no tunnel was opened
    tunnel = tunnels.current_tunnel() if tunnels is not None else None
    if tunnel is None or not tunnel.public or keys:
        return
    if tunnel.port == port or (_current is not None and tunnel is _current.tunnel):
        log.warning("closing the public tunnel %s: the new server on port %s has no API key", tunnel.url, port)
        tunnel.close()


def current_server() -> ServerHandle | None:
    """The server started by the last start_server call, if it is still running."""
    return _current


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise OSError(err.errno, f"port {port} on {host} is already in use: stop the program using it, "
                                     f"or pass port=0 for a free port") from None
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _serve(app, sock: socket.socket, log_level: str, timeout: float):
    import uvicorn

    from .security import redact_logs
    from .timeouts import head_deadline_protocol

    settings = app.state.service.settings
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off",
                            http=head_deadline_protocol(settings.head_timeout),
                            limit_concurrency=settings.limit_concurrency)
    redact_logs(app.state.service.settings.keys)  # after Config: it (re)configures uvicorn's loggers
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nbkit-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the HTTP server stopped while starting (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise TimeoutError(f"the HTTP server did not start within {timeout} s")
        time.sleep(0.01)
    return server, thread


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
