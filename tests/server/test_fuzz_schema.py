"""Fuzz every operation of the OpenAPI schema (schemathesis) against a real server on the embedded model.

Valid and invalid bodies, generated from the schema the server publishes: no answer may be a 5xx,
and every answer must be documented (status code, content type, headers, body schema). Bounded:
a few dozen examples per operation, generation limited to a couple of tokens per request.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -r requirements-dev.txt (schemathesis)")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis import checks  # noqa: E402

from nbkit.engine.loader import load_engine  # noqa: E402
from nbkit.engine.speculation import CostModel  # noqa: E402
from nbkit.server.app import Settings, create_app  # noqa: E402
from nbkit.server.launch import start_server  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = 60  # per operation
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance]


@pytest.fixture(scope="module")
def server():
    engine = load_engine("torch", max_batch=4, max_queue=16, cost_model=CostModel.from_function(lambda n: 0.03 + 0.0015 * n))
    # Small limits keep each generated request short: longer asks are (correctly) refused with 4xx.
    settings_ = Settings(max_new_tokens=2, max_input_tokens=64, rate_limit=None)
    handle = start_server(engine, port=0, settings=settings_)
    yield handle
    handle.stop(grace=0)
    engine.stop()


# The schema is the app's own (the same for every engine): built here so pytest can list its operations.
OPENAPI = create_app(None).openapi()
CONFIG = schemathesis.Config.from_dict({
    "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
})
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


def test_served_schema_is_the_fuzzed_one(server):
    import httpx

    assert httpx.get(server.url + "/openapi.json", timeout=30).json() == OPENAPI


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_openapi_fuzz_no_server_error_and_documented_answers(case, server):
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)


def test_tiny_top_p_keeps_the_most_likely_token():
    # Found by the fuzzer: top_p=5e-324 is 0 in fp32, every token was dropped and sampling raised (HTTP 500).
    import torch

    from nbkit.medusa.acceptance import probs_from_logits

    logits = torch.tensor([[0.5, 2.0, -1.0]])
    for top_p in (5e-324, 1e-45, 1e-9):
        probs = probs_from_logits(logits, 1.0, top_p=top_p)
        assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0]]))
