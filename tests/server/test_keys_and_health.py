"""Keys, /health and operator opt-ins (issue 13): each test starts its own server (one at a time per process).

Each test names the attack it covers; each failed before the fix.
"""

from __future__ import annotations

import httpx
import pytest
from helpers.server import tiny_engine

from nbkit.server.app import Settings
from nbkit.server.cli import read_keys
from nbkit.server.launch import start_server

KEY = "hardening-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_short_keys_are_refused():
    # Attack: a one-character key was accepted.
    with pytest.raises(ValueError, match="at least 16"):
        start_server(tiny_engine(), port=0, api_key="k")
    with pytest.raises(ValueError, match="at least 16"):
        Settings(api_key=["x" * 15]).keys  # noqa: B018



def test_keys_from_a_file_or_the_environment(tmp_path, monkeypatch):
    # Attack: --api-key is visible to every user of the machine in `ps`.
    file = tmp_path / "keys"
    file.write_text(f"# comment\n{KEY}\n\nsecond-key-abcdefghijkl\n")
    monkeypatch.setenv("NBKIT_API_KEY", "env-key-0123456789abcdef")
    assert read_keys(None, str(file)) == [KEY, "second-key-abcdefghijkl"]
    assert read_keys(None, None) == ["env-key-0123456789abcdef"]
    assert read_keys(["given-key-0123456789ab"], None) == ["given-key-0123456789ab"]
    with pytest.raises(OSError, match="cannot read"):
        read_keys(None, str(tmp_path / "missing"))
    from nbkit.cli import main

    monkeypatch.delenv("NBKIT_API_KEY")
    (tmp_path / "short").write_text("tiny\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "short")]) == 2  # refused before loading a model



def test_failed_key_attempts_are_throttled_per_address():
    # Attack: unlimited guesses. Behind a local proxy (ngrok) the address is the one the proxy forwards.
    handle = start_server(tiny_engine(), port=0, api_key=KEY)
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as http:
            bad = {"Authorization": "Bearer wrong-key-0123456789"}
            attacker = {**bad, "X-Forwarded-For": "203.0.113.7"}
            codes = [http.get("/info", headers=attacker).status_code for _ in range(12)]
            assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
            r = http.get("/info", headers={**AUTH, "X-Forwarded-For": "203.0.113.7"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # even with the key, for a while
            assert r.json()["error_type"] == "rate_limit"
            # Another address is not affected, nor is /health.
            assert http.get("/info", headers={**AUTH, "X-Forwarded-For": "198.51.100.1"}).status_code == 200
            assert http.get("/health", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
            assert http.get("/info", headers=bad).status_code == 401  # a direct local client: not throttled
    finally:
        handle.stop(grace=0)



def test_health_and_root_with_keys():
    handle = start_server(tiny_engine(), port=0, api_key=KEY)
    try:
        with httpx.Client(base_url=handle.url, timeout=30) as http:
            assert http.get("/").status_code == 200  # the chat page
            assert http.post("/", json={"inputs": "x"}).status_code == 401  # TGI's route needs the key
            assert http.post("/", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                             headers=AUTH).status_code == 200
            handle.engine.loop.dead = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.75 GiB total)"
            r = http.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "error"}  # no internals on the public URL
            handle.engine.loop.dead = None
    finally:
        handle.stop(grace=0)



def test_client_trees_when_the_operator_allows_them():
    opted = start_server(tiny_engine(), port=0, settings=Settings(allow_client_trees=True))
    try:
        r = httpx.post(opted.url + "/generate", json={"prompt": "x", "max_tokens": 2, "tree": "chain-2"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        opted.stop(grace=0)
