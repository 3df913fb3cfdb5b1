"""API keys on a real server over the embedded SmolLM2: every route but /health needs one, the compare
is constant-time, each key has its own rate limit, and no key or token ever shows in logs, errors,
/info, /metrics or the schema.
"""

from __future__ import annotations

import base64
import logging
import re

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from helpers.server import embedded_engine

from nbkit.server import security
from nbkit.server.app import CHAT_PAGE, Settings
from nbkit.server.launch import start_server

pytestmark = pytest.mark.slow

KEYS = ["sk-nbkit-alpha-0123456789abcdef", "sk-nbkit-beta-fedcba9876543210"]
HF_TOKEN = "hf_SecretHubToken0123456789abcd"
NGROK_TOKEN = "2NgrokSecretToken_abcdefghijklmnop"
SECRETS = [*KEYS, HF_TOKEN, NGROK_TOKEN]
GOOD = {"Authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def engine():
    yield from embedded_engine()


class LogCapture(logging.Handler):
    """Every record of the server's loggers (uvicorn access and error logs included), fully formatted."""

    LOGGERS = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "nbkit", "nbkit.server", "nbkit.engine")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        if record.name.startswith(("httpx", "httpcore")):
            return  # the test's own HTTP client, not the server
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()} {record.exc_text or ''}")

    def __enter__(self):
        self.levels = {}
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.addHandler(self)
            logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self.levels[name])

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def keyed(engine, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("NGROK_AUTHTOKEN", NGROK_TOKEN)
    handle = start_server(engine, port=0, api_key=KEYS, settings=Settings(rate_limit=None), log_level="debug")
    yield handle
    handle.stop(grace=0)


def all_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, the docs' included, plus HEAD/OPTIONS and unknown paths."""
    out = []
    for route in iter_route_contexts(app.routes):  # the included routers' routes too
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            out.append((method, route.path))
    return out + [("OPTIONS", "/generate"), ("HEAD", "/info"), ("GET", "/nothing"), ("POST", "/v1/embeddings"),
                  ("GET", "/docs/"), ("GET", "/metrics/"), ("GET", "//info")]


WRONG = {
    "none": {},
    "wrong key": {"Authorization": "Bearer sk-nbkit-alpha-0123456789abcdeX"},
    "prefix of a key": {"Authorization": f"Bearer {KEYS[0][:-1]}"},
    "key plus a char": {"Authorization": f"Bearer {KEYS[0]}0"},
    "upper case": {"Authorization": f"Bearer {KEYS[0].upper()}"},
    "no scheme": {"Authorization": KEYS[0]},
    "basic": {"Authorization": "Basic " + base64.b64encode(f"user:{KEYS[0]}".encode()).decode()},
    "empty bearer": {"Authorization": "Bearer"},
    "other header": {"X-Auth-Token": KEYS[0]},
    "wrong X-Api-Key": {"X-Api-Key": KEYS[0][:-1]},
    "wrong bearer, right X-Api-Key": {"Authorization": "Bearer sk-nbkit-alpha-0123456789abcdeX", "X-Api-Key": KEYS[0]},
    "cookie": {"Cookie": f"api_key={KEYS[0]}"},
    "two keys": {"Authorization": f"Bearer {KEYS[0]} {KEYS[1]}"},
}


def test_every_route_but_health_refuses_a_missing_or_wrong_key(keyed):
    routes = all_routes(keyed.app)
    paths = {p for _, p in routes}
    assert {"/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/v1/models", "/info",
            "/metrics", "/docs", "/redoc", "/openapi.json"} <= paths
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for method, path in routes:
            if path in ("/health", "/"):
                continue
            for name, headers in WRONG.items():
                r = http.request(method, keyed.url + path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (method, path, name, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                assert all(s not in r.text for s in SECRETS)
            r = http.request(method, keyed.url + path + "?api_key=" + KEYS[0], json={"prompt": "x"})
            assert r.status_code == 401, (method, path, "key in the query string")
        # Open: the health check (monitors) and the chat page, which holds nothing secret.
        assert http.get("/health").json() == {"status": "ok"}
        page = http.get("/")
        assert page.status_code == 200 and all(s not in page.text for s in SECRETS)
        # With the key every guarded route answers.
        for path in ("/info", "/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert http.get(path, headers=GOOD).status_code == 200, path
        assert http.get("/info", headers={"authorization": "bearer " + KEYS[1]}).status_code == 200
        assert http.get("/info", headers={"x-api-key": KEYS[1]}).status_code == 200  # llama-server's header


def test_the_chat_page_api_calls_need_the_key(keyed):
    calls = re.findall(r'fetch\("([^"]+)"', CHAT_PAGE.read_text())
    assert set(calls) == {"v1/models", "v1/chat/completions"}
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        for path in calls:
            r = http.request("GET" if path.endswith("models") else "POST", "/" + path, json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models", headers=GOOD).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json=body, headers=GOOD) as r:
            assert r.status_code == 200
            assert [line for line in r.iter_lines() if line.startswith("data:")][-1] == "data: [DONE]"


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    guard = security.Guard(app=None, keys=KEYS)
    cases = {f"Bearer {KEYS[0]}": 0, f"Bearer {KEYS[1]}": 1, "Bearer sk-nbkit-alpha-0123456789abcdeX": None,
             "Bearer short": None, "Bearer ": None}
    for header, expected in cases.items():
        calls.clear()
        assert guard._key_index(header.encode()) == expected
        # every key is compared, with hmac.compare_digest, whichever matched: the time does not say which
        assert sorted(b for _, b in calls) == sorted(k.encode() for k in KEYS), header


def test_rate_limit_is_per_key_and_refusals_never_reach_the_engine(engine):
    submitted = []
    real_submit = engine.submit

    def counting_submit(ids, params=None):
        submitted.append(ids)
        return real_submit(ids, params)

    handle = start_server(engine, port=0, api_key=KEYS, settings=Settings(rate_limit=3))
    engine.submit = counting_submit
    a, b = ({"Authorization": f"Bearer {k}"} for k in KEYS)
    body = {"prompt": "Hi", "max_tokens": 1}
    try:
        with httpx.Client(base_url=handle.url, timeout=60) as http:
            for _ in range(5):  # wrong keys are refused before the limiter: they spend nobody's budget
                assert http.post("/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert [http.post("/generate", json=body, headers=a).status_code for _ in range(3)] == [200] * 3
            r = http.post("/generate", json=body, headers=a)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json() == {"error": "rate limit exceeded: slow down", "error_type": "rate_limit"}
            r = http.post("/v1/chat/completions", headers=a,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            assert http.post("/generate", json=body, headers=b).status_code == 200  # the other key is unaffected
            assert http.get("/info", headers=a).status_code == 200  # reads are not limited
        assert len(submitted) == 4
    finally:
        del engine.submit
        handle.stop(grace=0)


def test_no_key_or_token_in_logs_errors_info_or_metrics(keyed, capfd):
    with LogCapture() as logs, httpx.Client(base_url=keyed.url, timeout=60) as http:
        seen = []
        requests = [
            ("POST", "/generate", {"prompt": "Hi", "max_tokens": 2}, GOOD),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
             {"Authorization": f"Bearer {KEYS[1]}"}),
            ("POST", "/generate", {"prompt": "Hi", "max_tokens": 10**9}, GOOD),  # 422
            ("POST", "/v1/completions", {"model": "nope", "prompt": "Hi"}, GOOD),  # 404
            ("POST", "/generate", {"prompt": "Hi"}, {"Authorization": f"Bearer {KEYS[0]}x"}),  # 401 near miss
            ("GET", f"/info?api_key={KEYS[0]}&hf={HF_TOKEN}", None, GOOD),  # secrets in the URL
            ("GET", f"/{KEYS[1]}/{NGROK_TOKEN}", None, GOOD),  # 404 with secrets in the path
            ("GET", "/info", None, GOOD),
            ("GET", "/metrics", None, GOOD),
            ("GET", "/openapi.json", None, GOOD),
            ("GET", "/health", None, {}),
        ]
        for method, path, body, headers in requests:
            r = http.request(method, path, json=body, headers=headers)
            seen.append(r.text + str(dict(r.headers)))
    printed = capfd.readouterr()
    assert "GET /info" in logs.text + printed.err  # the access log was captured
    for where, text in (("logs", logs.text), ("stdout", printed.out), ("stderr", printed.err),
                        ("answers", "\n".join(seen)), ("settings", repr(keyed.app.state.service.settings)),
                        ("handle", repr(keyed))):
        leaked = [line for line in text.splitlines() if any(s in line for s in SECRETS)]
        assert not leaked, (where, leaked)
