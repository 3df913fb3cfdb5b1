"""HTTP servers as subprocesses, for benchmarks that compare whole servers: `nbkit serve` with either engine,
and llama.cpp's own `llama-server` (built by nbkit from the same vendored llama.cpp, nbkit.gguf.build).

Each server gets a free port on 127.0.0.1 and its own log file; `start` returns once /health answers 200
(both servers answer 503 while the model loads).
"""

from __future__ import annotations

import enum
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

NO_PREFIX_CACHE = "--no-prefix-cache"  # `nbkit serve`'s switch for its prefix cache, where it has one


class Engine(enum.Enum):
    TORCH = "torch"
    LLAMACPP = "llamacpp"
    LLAMA_SERVER = "llama-server"


class Reuse(enum.Enum):
    """Whether a server may reuse the KV of a prompt prefix it has already computed."""

    ON = "reuse on"  # nbkit: the prefix cache (its default); llama-server: cache_prompt true
    OFF = "reuse off"  # nbkit: --no-prefix-cache; llama-server: cache_prompt false
    AS_IS = "as is"  # this `nbkit serve` has no prefix-cache switch: the server as it is, nothing toggled


@dataclass(frozen=True)
class Config:
    engine: Engine
    reuse: Reuse

    @property
    def name(self) -> str:
        if self.engine is Engine.LLAMA_SERVER:
            return f"llama-server cache_prompt {'on' if self.reuse is Reuse.ON else 'off'}"
        return f"{self.engine.value} {self.reuse.value}"


def has_prefix_cache_switch(help_text: str) -> bool:
    """Whether `nbkit serve --help` lists the switch that turns prefix reuse off."""
    return NO_PREFIX_CACHE in help_text.split()


def serve_help() -> str:
    """`nbkit serve --help` of the nbkit this process imports, the one the server subprocesses run (its parser
    built here: a `python -m nbkit serve --help` subprocess would cost seconds of imports)."""
    import argparse

    from ..server.cli import register_cli

    sub = argparse.ArgumentParser(prog="nbkit").add_subparsers()
    register_cli(sub)
    return sub.choices["serve"].format_help()


def configurations(engines: list[Engine], switch: bool, llama_server_off: bool = True) -> list[Config]:
    """Reuse on and off for each nbkit engine (only 'as is' without the switch), llama-server with cache_prompt
    on (and off when `llama_server_off`)."""
    configs = []
    for engine in engines:
        if engine is Engine.LLAMA_SERVER:
            configs += [Config(engine, Reuse.ON)] + ([Config(engine, Reuse.OFF)] if llama_server_off else [])
        else:
            reuse = [Reuse.ON, Reuse.OFF] if switch else [Reuse.AS_IS]
            configs += [Config(engine, r) for r in reuse]
    return configs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbkit_command(config: Config, port: int, model: str | None, heads: str | None, speculation: str,
                  max_batch: int, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "nbkit", "serve", "--engine", config.engine.value, "--host", "127.0.0.1",
           "--port", str(port), "--speculation", speculation, "--max-batch", str(max_batch), "--rate-limit", "0",
           "--log-level", "warning", "--log-interval", "0", "--calibrate", "at-start"]  # measured with trees priced
    cmd += ["--model", model] if model else []
    cmd += ["--heads", heads] if heads else []
    return cmd + list(extra) + ([NO_PREFIX_CACHE] if config.reuse is Reuse.OFF else [])


def llama_server_command(binary: Path, gguf: Path, port: int, slots: int, ctx_per_slot: int,
                         threads: int | None, extra: list[str]) -> list[str]:
    """llama-server on `gguf` with `slots` parallel slots. --jinja renders the GGUF's own chat template (the
    one nbkit applies), not llama.cpp's built-in guess of it."""
    cmd = [str(binary), "-m", str(gguf), "-np", str(slots), "-c", str(ctx_per_slot * slots), "--host", "127.0.0.1",
           "--port", str(port), "--no-webui", "--jinja"]
    cmd += ["-t", str(threads), "-tb", str(threads)] if threads else []
    return cmd + extra


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NBKIT_API_KEY", None)  # `nbkit serve` would require it; the servers listen on 127.0.0.1 only
    if threads:  # torch reads OMP_NUM_THREADS at import; the llama.cpp engine reads NBKIT_LLAMA_THREADS
        env.update(OMP_NUM_THREADS=str(threads), NBKIT_LLAMA_THREADS=str(threads))
    return env


class Server:
    """One server process; `url` is its base URL."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, threads: int | None = None):
        self.name, self.cmd, self.url, self.log = name, cmd, f"http://127.0.0.1:{port}", log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=_env(threads))

    def wait_ready(self, timeout: float) -> Server:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
        raise RuntimeError(f"{self.name} did not become ready within {timeout:.0f} s: {' '.join(self.cmd)}\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
