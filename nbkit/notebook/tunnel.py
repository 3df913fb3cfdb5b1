"""Reach a notebook's server from outside: an ngrok tunnel, Colab's own proxy, or nothing.

`open_tunnel(port, provider)`:
- "ngrok": a public https URL through pyngrok; the auth token comes from the Colab secret
  NGROK_AUTHTOKEN or $NGROK_AUTHTOKEN, and is never printed (ngrok echoes bad tokens in its errors,
  so its log lines are silenced and our messages are scrubbed).
- "colab": `google.colab.kernel.proxyPort`, a URL that works only for you, in your browser, while the
  notebook is open. No account needed. The chat page is shown in the notebook (an iframe), and no curl or
  openai example is printed: nothing outside your browser can use that URL.
- "none": the local URL.
- "auto": ngrok when a token is there, else Colab's proxy in Colab, else none.

A public URL is served only with an API key: the one given, else the Colab secret (or $) NBKIT_API_KEY,
else `api_key_for()` makes one (kept in the cache so re-runs reuse it; `Tunnel.rotate_key()` replaces it),
and `open_tunnel` refuses to publish a server that answers without it. A generated key is printed once,
when the tunnel opens; the tunnel's repr masks it. A tunnel belongs to its server: stopping the server
closes it, a server without a key started on its port closes it first, and re-opening (or switching kind)
closes the previous tunnel before anything else.
"""

from __future__ import annotations

import json
import logging
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..client import auth_headers
from ..models import cache_dir
from .env import in_colab, secret

log = logging.getLogger("nbkit.tunnel")
PROVIDERS = ("ngrok", "colab", "none", "auto")
NGROK_HELP = (
    "ngrok needs an auth token: add a Colab secret named NGROK_AUTHTOKEN (key icon on the left; the token is "
    "on https://dashboard.ngrok.com/get-started/your-authtoken) or set $NGROK_AUTHTOKEN. Without an ngrok "
    "account use provider='colab' (a URL only you can open) or provider='none'."
)


EVAL_JS_TIMEOUT_S = 30  # Colab's eval_js waits for the browser; a closed tab would hang the cell forever


class TunnelError(RuntimeError):
    """The tunnel could not be opened; the message says what to do."""


@dataclass
class Tunnel:
    provider: str  # "ngrok" | "colab" | "none"
    url: str  # what to call: the public URL, Colab's proxy URL, or the local one
    local_url: str
    public: bool  # reachable by anyone on the internet (so the API key matters)
    api_key: str | None = field(default=None, repr=False)
    key_generated: bool = field(default=False, repr=False)
    model: str | None = field(default=None, repr=False)  # the id the server serves (None: unknown)
    server: object = field(default=None, repr=False)  # the ServerHandle when serve() started it

    def generate(self, prompt: str, max_tokens: int = 50, chat: bool = True) -> dict:
        """POST /generate (the original contract) and print the answer: proof that the API answers.

        Through the public URL for ngrok; locally for Colab's proxy, which only your browser can open.
        chat=True asks the server to apply the model's chat template (instruct models need it)."""
        base = self.url if self.provider == "ngrok" else self.local_url
        body = {"prompt": prompt, "max_tokens": max_tokens, **({"chat": True} if chat else {})}
        request = urllib.request.Request(
            f"{base}/generate", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.headers}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as err:  # the server's own words, not urllib's traceback
            raise RuntimeError(f"POST /generate answered {err.code}: {err.read().decode(errors='replace')}") from None
        extra = {k: v for k, v in answer.items() if k != "response"}
        print(answer["response"].strip())
        if extra:
            print("  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        return answer

    @property
    def port(self) -> int | None:
        return urlparse(self.local_url).port

    def close(self) -> None:
        global _current
        if self.server is not None and getattr(self.server, "tunnel", None) is self:
            self.server.tunnel = None
        if self.provider == "ngrok":
            from pyngrok import ngrok
            from pyngrok.exception import PyngrokError

            try:
                ngrok.disconnect(self.url)
            except (PyngrokError, OSError):  # the agent is already gone: nothing left to close
                log.debug("ngrok tunnel %s was already closed", self.url)
        if _current is self:
            _current = None

    @property
    def headers(self) -> dict[str, str]:
        return auth_headers(self.api_key, ngrok=self.provider == "ngrok")

    def usage(self, show_key: bool = False) -> str:
        """How to call the API: curl and the openai client. show_key=True prints a key we generated (once, when
        the tunnel opens); otherwise it is masked."""
        key_ref = "$NBKIT_API_KEY"
        kind = "Public" if self.public else "Private" if self.provider == "colab" else "Local"
        lines = [f"{kind} URL ({self.provider}): {self.url}"]
        if self.provider == "colab":
            lines.append("  This URL works only in your browser while this notebook is open (the chat page is "
                         "shown below). curl, openai and other machines cannot use it: for a public API use "
                         "tunnel='ngrok' with the NGROK_AUTHTOKEN secret.")
            return "\n".join(lines)
        if self.api_key and self.key_generated and show_key:
            lines.append(f"API key, generated for this public URL (every route but /health requires it; clear "
                         f"this output before sharing the notebook): export NBKIT_API_KEY={self.api_key}")
        elif self.api_key and self.key_generated:
            lines.append(f"API key: generated, shown once when the tunnel opened ({_mask(self.api_key)}); it is in "
                         f"{_key_file()}. tunnel.rotate_key() makes a new one.")
        elif self.api_key:
            lines.append("API key: the one you gave (not shown); export it as NBKIT_API_KEY.")
        auth = f' -H "Authorization: Bearer {key_ref}"' if self.api_key else ""
        skip = ' -H "ngrok-skip-browser-warning: 1"' if self.provider == "ngrok" else ""
        lines += [
            "",
            "curl:",
            f"  curl {self.url}/generate{auth}{skip} -H 'Content-Type: application/json' \\",
            "       -d '{\"prompt\": \"What is Medusa decoding?\", \"max_tokens\": 50}'",
            "",
            "Python (pip install openai):",
            "  import os",
            "  from openai import OpenAI",
            f"  client = OpenAI(base_url=\"{self.url}/v1\", "
            + ("api_key=os.environ[\"NBKIT_API_KEY\"]" if self.api_key else "api_key=\"none\"")
            + (", default_headers={\"ngrok-skip-browser-warning\": \"1\"}" if self.provider == "ngrok" else "")
            + ")",
            (f"  reply = client.chat.completions.create(model=\"{self.model or 'default'}\", "
             "messages=[{\"role\": \"user\", \"content\": \"Hello!\"}])"),
            "  print(reply.choices[0].message.content)",
        ]
        return "\n".join(lines)

    def rotate_key(self, show: bool = True) -> None:
        """Replace the API key with a new generated one: the server requires it at once, the old key stops
        working, and the new one is printed once (show=False: read it from `tunnel.api_key`)."""
        server = self.server or _server_on(self.port)
        if server is None:
            raise TunnelError("this tunnel's server is not running in this notebook: restart it with a new key")
        key = _new_key()
        server.set_api_key(key)
        self.api_key, self.key_generated, self.server = key, True, server
        if show:
            print(f"New API key (the old one no longer works; clear this output before sharing the notebook): "
                  f"export NBKIT_API_KEY={key}")

    def __repr__(self) -> str:  # shown when a cell ends with the tunnel: never the key
        return self.usage(show_key=False)


_current: Tunnel | None = None


def _port_of(target) -> int:
    """A port number, or a server handle / URL whose port we tunnel to."""
    if isinstance(target, int):
        return target
    url = getattr(target, "url", target)
    port = urlparse(str(url)).port
    if port is None:
        raise ValueError(f"cannot tell the port of {target!r}")
    return port


def _key_file() -> Path:
    return cache_dir() / "api_key"


def _mask(key: str) -> str:
    return key[:4] + "..." if len(key) > 12 else "***"


def _new_key() -> str:
    key = "nbk-" + secrets.token_urlsafe(24)
    _key_file().parent.mkdir(parents=True, exist_ok=True)
    _key_file().touch(mode=0o600)
    _key_file().write_text(key)
    return key


def _server_on(port: int | None):
    """The ServerHandle of this process that serves `port`, if any (launch not imported: none)."""
    import sys

    launch = sys.modules.get("nbkit.server.launch")
    handle = launch.current_server() if launch is not None else None
    return handle if handle is not None and handle.port == port and handle.running else None


def _generated_key() -> str | None:
    file = _key_file()
    return (file.read_text().strip() or None) if file.is_file() else None


def ngrok_token(token: str | None = None) -> str | None:
    return token or secret("NGROK_AUTHTOKEN")[0]


def ngrok_status() -> str:
    """Where the ngrok token would come from (never the token itself)."""
    token, source = secret("NGROK_AUTHTOKEN")
    if token:
        return f"ngrok: token found ({source}); it is not shown. tunnel='auto' will open a public URL."
    where = "Colab's proxy (a URL only you can open)" if in_colab() else "the local URL only"
    return f"ngrok: no token. tunnel='auto' will use {where}. {NGROK_HELP}"


def resolve_provider(provider: str, token: str | None = None) -> str:
    """'auto' -> ngrok if a token is there, else colab in Colab, else none."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
    if provider != "auto":
        return provider
    if ngrok_token(token):
        return "ngrok"
    return "colab" if in_colab() else "none"


def api_key_for(provider: str = "auto", api_key: str | None = None, ngrok_authtoken: str | None = None) -> str | None:
    """The key the server must require: the one given, the Colab secret (or $) NBKIT_API_KEY, or for a public
    URL a generated one (reused on re-runs)."""
    api_key = api_key or secret("NBKIT_API_KEY")[0]
    if api_key:
        return api_key
    if resolve_provider(provider, ngrok_authtoken) != "ngrok":
        return None
    return _generated_key() or _new_key()


def _requires_key(local_url: str) -> bool:
    """Does the server refuse an unauthenticated generation route? (401/403 = yes)."""
    try:
        urllib.request.urlopen(urllib.request.Request(f"{local_url}/v1/models"), timeout=10)
    except urllib.error.HTTPError as err:
        return err.code in (401, 403)
    except OSError:
        return False
    return False


def _model_id(local_url: str, api_key: str | None) -> str | None:
    request = urllib.request.Request(f"{local_url}/v1/models", headers=auth_headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _scrub(text: str, *values: str | None) -> str:
    for value in values:
        if value:
            text = text.replace(value, "***")
    return text


def _open_ngrok(port: int, token: str | None, ngrok_path: str | None, config_path: str | None) -> str:
    if not token:
        raise TunnelError(NGROK_HELP)
    try:
        from pyngrok import conf, ngrok
        from pyngrok.exception import PyngrokError
    except ImportError as err:
        raise TunnelError("pyngrok is not installed: pip install pyngrok") from err
    # pyngrok logs ngrok's own lines; a rejected token comes back inside them.
    logging.getLogger("pyngrok").setLevel(logging.CRITICAL + 1)
    config = conf.PyngrokConfig(auth_token=token, ngrok_path=ngrok_path, config_path=config_path)
    conf.set_default(config)  # so close() and later calls talk to the same agent
    try:
        tunnel = ngrok.connect(str(port), "http", pyngrok_config=config)
    except PyngrokError as err:
        message = _scrub(str(getattr(err, "ngrok_error", None) or err), token)
        if "4018" in message or "authtoken" in message.lower() or "authentication" in message.lower():
            raise TunnelError(f"ngrok rejected the auth token: {message}\n{NGROK_HELP}") from None
        raise TunnelError(f"ngrok could not open a tunnel: {message}") from None
    return tunnel.public_url


def _open_colab(port: int) -> str:
    if not in_colab():
        raise TunnelError("provider='colab' works only inside Google Colab; use 'ngrok' or 'none' here.")
    from google.colab.output import eval_js  # type: ignore[import-not-found]

    try:
        url = eval_js(f"google.colab.kernel.proxyPort({port})", timeout_sec=EVAL_JS_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 -- Colab raises its own TimeoutException when the browser does not answer
        raise TunnelError(f"Colab's proxy did not answer within {EVAL_JS_TIMEOUT_S} s ({type(err).__name__}): is "
                          "this notebook open in a browser tab? Or use tunnel='ngrok' or 'none'.") from None
    return str(url).rstrip("/")


def show_colab_page(port: int, path: str = "/", height: int = 560) -> None:
    """Show the server's page (the chat page at /) inside the notebook, through Colab's proxy."""
    from google.colab.output import serve_kernel_port_as_iframe  # type: ignore[import-not-found]

    serve_kernel_port_as_iframe(port, path=path, height=height)


def open_tunnel(
    target, provider: str = "auto", api_key: str | None = None, *, ngrok_authtoken: str | None = None,
    ngrok_path: str | None = None, ngrok_config: str | None = None, host: str = "127.0.0.1", show: bool = True,
) -> Tunnel:
    """Make the server on `target` (a port, a URL or a server handle) reachable and print how to call it.

    For a public URL the server must require `api_key` (see `api_key_for`); one that answers without a key
    is not published."""
    global _current
    port = _port_of(target)
    local_url = f"http://{host}:{port}"
    token = ngrok_token(ngrok_authtoken)
    chosen = resolve_provider(provider, token)
    if _current is not None:
        _current.close()
    if chosen == "ngrok":
        api_key = api_key or api_key_for("ngrok", None, token or "-")
        if not _requires_key(local_url):
            raise TunnelError(
                f"the server at {local_url} answers without an API key; a public URL would let anyone use it. "
                "Start it with api_key=api_key_for(...) (the notebooks do) and open the tunnel again.")
        url = _open_ngrok(port, token, ngrok_path, ngrok_config)
    elif chosen == "colab":
        url = _open_colab(port)
    else:
        url = local_url
    tunnel = Tunnel(chosen, url, local_url, public=chosen == "ngrok", api_key=api_key,
                    key_generated=bool(api_key) and api_key == _generated_key(), model=_model_id(local_url, api_key))
    server = target if hasattr(target, "app") and hasattr(target, "stop") else _server_on(port)
    if server is not None:
        tunnel.server = server
        server.tunnel = tunnel  # stopping the server closes the tunnel
    _current = tunnel
    if show:
        print(tunnel.usage(show_key=True))
        if chosen == "colab":
            show_colab_page(port)
    return tunnel


def serve(
    prepared, provider: str = "auto", port: int = 8000, api_key: str | None = None, *,
    ngrok_authtoken: str | None = None, ngrok_path: str | None = None, ngrok_config: str | None = None,
    show: bool = True, llama_mode: str = "auto", **server_kwargs,
) -> Tunnel:
    """Start (or replace) the server for `prepared` (hub.prepare) with the right API key, then open the tunnel.

    A public URL gets a generated key when none is given (the same one on re-runs); the key is printed only
    if it was generated. llama_mode ("exact", "fast", or "auto": exact on a CPU, fast with GPU offload) is
    the llama.cpp engine's numerics (README).
    `server_kwargs` go to nbkit.server.launch.start_server (speculation, max_batch, prefix_cache=False, ...)."""
    from ..server.launch import start_server
    from ..server.request_log import show_logs

    if llama_mode not in ("auto", "exact", "fast"):
        raise ValueError(f"LLAMA_MODE must be 'auto', 'exact' or 'fast', not {llama_mode!r}")
    if prepared.engine == "llamacpp":
        server_kwargs["exact"] = {"auto": None, "exact": True, "fast": False}[llama_mode]

    if _current is not None:  # switching kind, or a re-run: nothing stays published while servers change
        _current.close()
    key = api_key_for(provider, api_key, ngrok_authtoken)
    if hasattr(prepared, "wait_for_engine"):
        prepared.wait_for_engine()  # the llama.cpp build may still run in the background
    server_kwargs.setdefault("kv_budget_bytes", getattr(prepared, "kv_budget_bytes", None))  # the plan's
    server_kwargs.setdefault("calibrate", "while-serving")  # the chat works at once; trees once priced
    handle = start_server(model=prepared.model, heads=prepared.heads, engine=prepared.engine, port=port,
                          api_key=key, **server_kwargs)
    if show:  # each finished request's latency line and the engine's periodic line, under the serve cell
        show_logs("info", "stdout")
    check = getattr(handle.engine, "self_check", None)
    if show and check is not None:  # the lossless promise, checked on this very GPU
        print(check.describe())
    return open_tunnel(handle, provider, key, ngrok_authtoken=ngrok_authtoken, ngrok_path=ngrok_path,
                       ngrok_config=ngrok_config, show=show)


def connect(url: str, api_key: str | None = None) -> Tunnel:
    """A server that runs elsewhere (another notebook, another machine), used like a tunnel."""
    url = url.rstrip("/")
    public = urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1")
    provider = "ngrok" if "ngrok" in url else "remote" if public else "none"
    return Tunnel(provider, url, url, public, api_key=api_key, model=_model_id(url, api_key))


def current_tunnel() -> Tunnel | None:
    return _current
