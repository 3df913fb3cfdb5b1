"""The HTTP layer: turns HTTP requests into engine requests and streams the tokens back.

`create_app(engine, settings)` serves, over one engine:
- the project's original contract `POST /generate {"prompt", "max_tokens"} -> {"response"}`, and TGI's
  `POST /generate {"inputs", "parameters"}` and `POST /generate_stream` (SSE token events);
- OpenAI's `POST /v1/completions`, `POST /v1/chat/completions` (both also streamed) and `GET /v1/models`,
  also without the /v1 prefix as llama-server serves them;
- the tokenizer: `POST /tokenize`, `POST /detokenize` (llama-server's and vLLM's shapes);
- `GET /health`, `GET /info`, `GET /metrics` (Prometheus) and a chat page at `GET /`.

Every refusal is a JSON error in the style of the route's API (errors.py): bad input is 4xx, a full
queue 429 with Retry-After, never a 500. Every accepted request ends with an answer or an error:
the engine finishes each request exactly once, and `Service.follow` also gives up on a dead engine.

Routes live in routes/ (one APIRouter per API), what they share in service.py (through Depends),
the SSE streams in streams.py; this module assembles them with the error handlers and middleware.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .errors import APIError, describe_validation, error_response
from .metrics import CountRequests, Metrics
from .routes import generate, openai, ops, tokens
from .routes.ops import CHAT_PAGE  # noqa: F401  (where the chat page lives; tests read it)
from .security import BodyLimit, Guard
from .service import Service, Settings

__all__ = ["Settings", "create_app"]

log = logging.getLogger("nbkit.server")


def create_app(engine=None, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app over `engine` (a started Engine, or None: attach it later with
    `app.state.service.attach(engine)`; /health answers 503 "loading" meanwhile)."""
    settings = settings or Settings()
    app = FastAPI(title="nbkit", version=__version__,
                  description="Medusa speculative decoding with continuous batching: the original /generate "
                              "contract, TGI and OpenAI-compatible APIs.")
    metrics = Metrics(routes=set())
    app.state.service = Service(engine, settings, metrics)
    app.include_router(generate.router)
    app.include_router(openai.router, prefix="/v1")
    app.include_router(openai.router, include_in_schema=False)  # llama-server serves them unprefixed too
    app.include_router(tokens.router)
    app.include_router(ops.router)
    _add_error_handlers(app)
    metrics.routes.update(r.path for r in iter_route_contexts(app.routes))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    settings.keys  # noqa: B018 -- refuse bad keys now, not on the first request
    svc = app.state.service
    app.add_middleware(Guard, keys=lambda: svc.settings.keys, rate_limit=settings.rate_limit)  # rotatable
    if settings.cors_origins:  # outside the Guard: preflights carry no key, and refusals get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts the guards' refusals too
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal is a JSON error in the route's API style, never an HTML page or a bare 500."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        message, param = describe_validation(err.errors())
        return error_response(request.url.path, APIError(None, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 400:  # FastAPI could not decode the body (invalid UTF-8, ...): a validation error
            return error_response(request.url.path, APIError(None, f"the body is not valid JSON: {err.detail}"))
        kind = "not_found" if err.status_code == 404 else "validation"
        return error_response(request.url.path, APIError(err.status_code, str(err.detail), kind,
                                                         headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, APIError(500, "internal server error", "internal"))
