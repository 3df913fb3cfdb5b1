"""A tunnel belongs to its server (issue 13). ngrok is faked: `_open_ngrok` hands out a made-up URL and
pyngrok's `disconnect` only records; nothing reaches ngrok.

Attacks, each failing before the fix:
- `ServerHandle.stop` left the public tunnel open;
- `start_server()` without a key on the port behind a public tunnel put an open server behind the public URL;
- `serve()` switching tunnel kind started the new server before closing the old tunnel;
- the generated key was shown again by the tunnel's repr, and could not be rotated.
"""

from __future__ import annotations

import httpx
import pytest
from helpers.server import tiny_engine

from nbkit.notebook import tunnel as tun
from nbkit.server import launch
from nbkit.server.launch import start_server

KEY = "lifecycle-key-0123456789"


@pytest.fixture
def events(monkeypatch, tmp_path):
    """The fake ngrok: the order in which tunnels open and close (and servers start)."""
    import pyngrok.ngrok

    log: list[tuple[str, object]] = []
    count = iter(range(1, 1000))
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tun, "_open_ngrok", lambda port, *a: log.append(("open", port)) or
                        f"https://fake-{next(count)}.ngrok-free.app")
    monkeypatch.setattr(pyngrok.ngrok, "disconnect", lambda url, *a, **k: log.append(("close", url)))
    yield log
    if tun.current_tunnel() is not None:
        tun.current_tunnel().close()
    if launch.current_server() is not None:
        launch.current_server().stop(grace=0)


def test_stopping_the_server_closes_its_tunnel(events):
    handle = start_server(tiny_engine(), port=0, api_key=KEY)
    t = tun.open_tunnel(handle, "ngrok", KEY, ngrok_authtoken="fake-token", show=False)
    assert handle.tunnel is t and t.server is handle
    handle.stop(grace=0)
    assert events == [("open", handle.port), ("close", t.url)]
    assert tun.current_tunnel() is None


def test_a_server_without_key_on_a_published_port_closes_the_tunnel_first(events):
    keyed = start_server(tiny_engine(), port=0, api_key=KEY)
    port = keyed.port
    t = tun.open_tunnel(port, "ngrok", KEY, ngrok_authtoken="fake-token", show=False)  # by port: still tied
    assert keyed.tunnel is t
    # The same port again, without a key: the public URL must not lead to it.
    open_server = start_server(tiny_engine(), port=port)
    try:
        assert ("close", t.url) in events and tun.current_tunnel() is None
        assert not keyed.running and open_server.tunnel is None
    finally:
        open_server.stop(grace=0)


def test_a_tunnel_opened_by_port_alone_closes_before_an_unkeyed_server(events, monkeypatch):
    monkeypatch.setattr(tun, "_requires_key", lambda url: True)
    t = tun.open_tunnel(0, "ngrok", KEY, ngrok_authtoken="fake-token", show=False)  # no server of ours yet
    launch._close_unkeyed_tunnel(0, keys=[KEY])
    assert tun.current_tunnel() is t  # a keyed server may take the port
    launch._close_unkeyed_tunnel(0, keys=[])
    assert tun.current_tunnel() is None and events[-1] == ("close", t.url)


def test_switching_tunnel_kind_closes_the_old_tunnel_before_the_new_server(events, monkeypatch):
    from nbkit.notebook.hub import Prepared

    real_start = launch.start_server

    def start(*args, **kwargs):
        events.append(("start_server", kwargs.get("api_key")))
        kwargs.update(port=0)
        return real_start(tiny_engine(), **{k: v for k, v in kwargs.items() if k not in ("model", "heads", "engine")})

    monkeypatch.setattr(launch, "start_server", start)
    first = tun.serve(Prepared(None, "none", "torch"), "ngrok", api_key=KEY, ngrok_authtoken="fake-token",
                      show=False)
    assert first.public and first.server.tunnel is first
    second = tun.serve(Prepared(None, "none", "torch"), "none", show=False)
    kinds = [e[0] for e in events]
    assert kinds == ["start_server", "open", "close", "start_server"], events  # closed before the new server
    assert not second.public and tun.current_tunnel() is second


def test_generated_key_shown_once_masked_in_repr_and_rotated(events, capsys):
    key = tun.api_key_for("ngrok", None, "fake-token")
    handle = start_server(tiny_engine(), port=0, api_key=key)
    t = tun.open_tunnel(handle, "ngrok", key, ngrok_authtoken="fake-token")
    assert capsys.readouterr().out.count(key) == 1  # printed when the tunnel opened
    assert key not in repr(t) and key not in str(t) and "rotate_key" in repr(t)
    body = {"prompt": "Hi", "max_tokens": 2}
    assert httpx.post(handle.url + "/generate", json=body, headers=t.headers).status_code == 200
    t.rotate_key()
    new = t.api_key
    assert new != key and capsys.readouterr().out.count(new) == 1 and new not in repr(t)
    assert tun.api_key_for("ngrok", None, "fake-token") == new  # re-runs reuse the new key
    assert httpx.post(handle.url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert httpx.post(handle.url + "/generate", json=body, headers=t.headers).status_code == 200
    handle.stop(grace=0)
