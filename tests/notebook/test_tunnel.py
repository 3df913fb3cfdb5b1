"""open_tunnel: a fake ngrok agent (pyngrok drives any binary we point it at), Colab's proxy, and none."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nbkit.models import cache_dir
from nbkit.notebook import tunnel as tun

MODELS = cache_dir() / "models"  # the converted embedded model, reused by the end-to-end test

# Speaks the ngrok v3 agent's protocol as far as pyngrok uses it: logfmt lines on stdout for start-up,
# then the local agent API (/api/endpoints). Like the real agent it refuses to start without a token
# (ERR_NGROK_4018) and echoes a rejected token back in its error line.
FAKE_NGROK = textwrap.dedent('''\
    import json, sys, threading, uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    args = sys.argv[1:]
    if args[:1] == ["--version"] or args[:1] == ["version"]:
        print("ngrok version 3.99.0"); sys.exit(0)
    if args[:2] == ["config", "add-authtoken"]:
        print("Authtoken saved to configuration file"); sys.exit(0)
    token = args[args.index("--authtoken") + 1] if "--authtoken" in args else None
    if not token:
        print('t=now lvl=eror msg="failed to reconnect session" err="authentication failed: Usage of ngrok '
              'requires a verified account and authtoken. ERR_NGROK_4018"', flush=True)
        sys.exit(1)
    if token.startswith("bad"):
        print(f't=now lvl=eror msg="failed to reconnect session" err="authentication failed: The authtoken you '
              f'specified does not look like a proper ngrok tunnel authtoken. Your authtoken: {token} ERR_NGROK_105"',
              flush=True)
        sys.exit(1)
    endpoints = {}

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, body=None):
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"endpoints": list(endpoints.values()), "uri": "/api/endpoints"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body["name"]
            endpoints[name] = {"name": name, "uri": "/api/endpoints/" + name, "upstream": body["upstream"],
                               "url": f"https://fake-{uuid.uuid4().hex[:8]}.ngrok-free.app"}
            with open(sys.argv[0] + ".log", "a") as log:
                log.write(json.dumps(body) + "\\n")
            self._send(201, endpoints[name])

        def do_DELETE(self):
            endpoints.pop(self.path.rsplit("/", 1)[-1], None)
            self._send(204)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f't=now lvl=info msg="starting web service" obj=web addr=127.0.0.1:{server.server_port}', flush=True)
    print('t=now lvl=info msg="tunnel session started" obj=tunnels.session', flush=True)
    print('t=now lvl=info msg="client session established" obj=tunnels.session', flush=True)
    threading.Event().wait()
''')


@pytest.fixture
def fake_ngrok(tmp_path):
    exe = tmp_path / "ngrok"
    exe.write_text(f"#!{sys.executable}\n" + FAKE_NGROK)
    exe.chmod(0o755)
    config = tmp_path / "ngrok.yml"
    config.write_text('version: "3"\nagent:\n  authtoken: ""\n')
    yield {"ngrok_path": str(exe), "ngrok_config": str(config), "log": tmp_path / "ngrok.log"}
    from pyngrok import process

    process.kill_process(str(exe))


@pytest.fixture
def keyed_server():
    """A stand-in for an nbkit server: /v1/models needs `Bearer secret-key`, /health does not."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            ok = self.path == "/health" or self.headers.get("Authorization") == "Bearer secret-key"
            body = json.dumps({"data": [{"id": "SmolLM2-135M-Instruct"}]} if ok else {"error": "no key"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)
    yield
    if tun.current_tunnel() is not None:
        tun.current_tunnel().close()


def test_none_prints_the_local_url(capsys):
    t = tun.open_tunnel(8123, provider="none")
    out = capsys.readouterr().out
    assert t.url == "http://127.0.0.1:8123" and not t.public
    assert "Local URL (none): http://127.0.0.1:8123" in out
    assert "curl http://127.0.0.1:8123/generate" in out and "Authorization" not in out


def test_ngrok_through_the_fake_agent(fake_ngrok, keyed_server, monkeypatch, capsys):
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-123456789-abcdef")
    t = tun.open_tunnel(keyed_server, provider="ngrok", api_key="secret-key",
                        ngrok_path=fake_ngrok["ngrok_path"], ngrok_config=fake_ngrok["ngrok_config"])
    out = capsys.readouterr().out
    assert t.public and t.provider == "ngrok"
    assert t.url.startswith("https://fake-") and t.url.endswith(".ngrok-free.app")
    # The agent was asked to forward to our port.
    asked = json.loads(fake_ngrok["log"].read_text().splitlines()[-1])
    assert asked["upstream"]["url"] == f"http://localhost:{keyed_server}"
    # How to call it, with the browser-warning header and the real model id, and no secret in sight.
    assert f"curl {t.url}/generate" in out and "ngrok-skip-browser-warning: 1" in out
    assert 'model="SmolLM2-135M-Instruct"' in out and f'base_url="{t.url}/v1"' in out
    assert "secret-key" not in out and "tok-123456789-abcdef" not in out
    assert "$NBKIT_API_KEY" in out
    # Re-running the cell replaces the tunnel instead of adding one.
    t2 = tun.open_tunnel(keyed_server, provider="ngrok", api_key="secret-key", show=False,
                         ngrok_path=fake_ngrok["ngrok_path"], ngrok_config=fake_ngrok["ngrok_config"])
    from pyngrok import ngrok

    assert [x.public_url for x in ngrok.get_tunnels()] == [t2.url]


def test_ngrok_without_a_token_fails_clearly(fake_ngrok, keyed_server):
    with pytest.raises(tun.TunnelError, match="NGROK_AUTHTOKEN"):
        tun.open_tunnel(keyed_server, provider="ngrok", api_key="secret-key",
                        ngrok_path=fake_ngrok["ngrok_path"], ngrok_config=fake_ngrok["ngrok_config"])
    assert not fake_ngrok["log"].exists()  # we did not even start the agent


def test_ngrok_rejecting_the_token_does_not_echo_it(fake_ngrok, keyed_server, capsys):
    with pytest.raises(tun.TunnelError) as err:
        tun.open_tunnel(keyed_server, provider="ngrok", api_key="secret-key", ngrok_authtoken="bad-token-xyz987",
                        ngrok_path=fake_ngrok["ngrok_path"], ngrok_config=fake_ngrok["ngrok_config"])
    captured = capsys.readouterr()
    assert "rejected the auth token" in str(err.value) and "NGROK_AUTHTOKEN" in str(err.value)
    assert "bad-token-xyz987" not in str(err.value) + captured.out + captured.err


def test_public_url_needs_a_server_that_requires_the_key(fake_ngrok, keyed_server, monkeypatch):
    # No key given: one is generated and reused, but a server started without it is not published.
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-123456789-abcdef")
    key = tun.api_key_for("auto")
    assert key.startswith("nbk-") and len(key) > 30 and tun.api_key_for("ngrok") == key
    assert tun.api_key_for("none") is None and tun.api_key_for("ngrok", "mine") == "mine"

    class Open(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Open)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(tun.TunnelError, match="answers without an API key"):
            tun.open_tunnel(server.server_port, provider="ngrok", ngrok_path=fake_ngrok["ngrok_path"],
                            ngrok_config=fake_ngrok["ngrok_config"])
    finally:
        server.shutdown()
        server.server_close()
    assert not fake_ngrok["log"].exists()


def test_generated_key_is_shown_once_for_the_user(fake_ngrok, monkeypatch, capsys):
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-123456789-abcdef")
    key = tun.api_key_for("ngrok")
    monkeypatch.setattr(tun, "_requires_key", lambda url: True)
    t = tun.open_tunnel(9, provider="ngrok", api_key=key, ngrok_path=fake_ngrok["ngrok_path"],
                        ngrok_config=fake_ngrok["ngrok_config"])
    out = capsys.readouterr().out
    assert t.key_generated and f"export NBKIT_API_KEY={key}" in out
    assert "tok-123456789-abcdef" not in out


def test_colab_proxy(monkeypatch, capsys):
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    output = types.ModuleType("google.colab.output")
    asked = []
    output.eval_js = lambda js, timeout_sec=None: asked.append(js) or "https://abc-8000-colab.googleusercontent.com/"
    output.serve_kernel_port_as_iframe = lambda port, path="/", height=400: asked.append(("iframe", port, path))
    colab.output = output
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    t = tun.open_tunnel("http://127.0.0.1:8000", provider="auto")  # no ngrok token in Colab -> its proxy
    assert asked[0] == "google.colab.kernel.proxyPort(8000)"
    assert t.provider == "colab" and t.url == "https://abc-8000-colab.googleusercontent.com" and not t.public
    out = capsys.readouterr().out
    assert "only in your browser" in out
    # The chat page is shown inline; no curl/openai example for a URL that only this browser can open.
    assert asked[1:] == [("iframe", 8000, "/")]
    assert "curl http" not in out and "OpenAI(" not in out


def test_colab_outside_colab_is_a_clear_error():
    with pytest.raises(tun.TunnelError, match="only inside Google Colab"):
        tun.open_tunnel(8000, provider="colab")
    with pytest.raises(ValueError, match="provider"):
        tun.open_tunnel(8000, provider="cloudflare")


@pytest.mark.slow
def test_serve_publishes_only_with_a_generated_key(fake_ngrok, monkeypatch, tmp_path, capsys):
    """serve() end to end with the real server: no key given + ngrok -> a key is generated, the server
    requires it on every route but /health, and it is shown once so the user can call the API."""
    import httpx

    from nbkit.notebook.hub import Prepared

    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "models").symlink_to(MODELS)
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-123456789-abcdef")
    public = tun.serve(Prepared(None, "none", "torch"), "auto", port=0, max_batch=2,
                       ngrok_path=fake_ngrok["ngrok_path"], ngrok_config=fake_ngrok["ngrok_config"])
    try:
        out = capsys.readouterr().out
        key = public.api_key
        assert public.provider == "ngrok" and public.public and key.startswith("nbk-")
        assert f"export NBKIT_API_KEY={key}" in out and "tok-123456789-abcdef" not in out
        assert "self-check passed on cpu (float32)" in out  # the lossless check on the serving device, shown
        local = public.local_url
        assert httpx.get(f"{local}/health").status_code == 200
        assert httpx.post(f"{local}/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 401
        ok = httpx.post(f"{local}/generate", json={"prompt": "Hi", "max_tokens": 2},
                        headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and "response" in ok.json()
        # Re-running the cell keeps the same key, so clients already given it keep working.
        again = tun.serve(Prepared(None, "none", "torch"), "auto", port=0, max_batch=2, show=False,
                          ngrok_path=fake_ngrok["ngrok_path"], ngrok_config=fake_ngrok["ngrok_config"])
        assert again.api_key == key and not public.server.running
        public = again
    finally:
        public.server.stop()
