"""Operations: `GET /health`, `GET /info`, `GET /metrics` (Prometheus) and the chat page at `GET /`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ... import __version__
from ..metrics import CONTENT_TYPE
from ..schemas_ops import Health, Info, PrefixCacheInfo
from ..service import Service, get_service

CHAT_PAGE = Path(__file__).resolve().parents[1] / "static" / "chat.html"

router = APIRouter(tags=["operations"])


@cache
def chat_page() -> str:
    return CHAT_PAGE.read_text(encoding="utf-8")


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(svc: Service = Depends(get_service)):
    """200 `{"status": "ok"}` when requests can be served; 503 while loading, stopping, or if the engine died.
    Open even when an API key is set; then it says no more than the status (no error text)."""
    status, why = svc.status()
    if status == "ok":
        return JSONResponse({"status": "ok"})
    if svc.settings.keys:  # open to anyone on the public URL: the state, not the engine's error text
        return JSONResponse({"status": status}, status_code=503)
    return JSONResponse({"status": status, "error": why}, status_code=503)


@router.get("/info", response_model=Info)
async def info(svc: Service = Depends(get_service)):
    """The model, engine and limits (TGI's /info fields where they exist)."""
    settings = svc.settings
    limits = svc.engine.limits() if svc.engine is not None else None
    max_input, total = svc.limits()
    return Info(model_id=svc.model_id, engine=settings.engine_name, engine_reason=settings.engine_reason,
                status=svc.status()[0],
                heads=limits.heads if limits else None, speculation=limits.speculation if limits else None,
                **((limits.numerics or {}) if limits else {}),
                max_concurrent_requests=limits.max_batch if limits else None,
                max_queue=limits.max_queue if limits else None,
                max_input_tokens=max_input, max_total_tokens=total, max_new_tokens=settings.max_new_tokens,
                max_stop_sequences=settings.max_stop, max_body_bytes=settings.max_body_bytes,
                api_key_required=bool(settings.keys), rate_limit_per_minute=settings.rate_limit or None,
                self_check=limits.self_check if limits else None,
                calibration=limits.calibration if limits else None,
                calibration_progress=limits.calibration_progress if limits else None,
                prefix_cache=prefix_info(svc.engine),
                version=__version__)


def prefix_info(engine) -> PrefixCacheInfo | None:
    if engine is None:
        return None
    s = engine.snapshot()
    return PrefixCacheInfo(enabled=s["prefix_cache"], cached_tokens=s["prefix_cached_tokens"], hits=s["prefix_hits"],
                           hit_rate=s["prefix_hit_rate"], evictions=s["prefix_evictions"],
                           retained_tokens=s["prefix_retained_tokens"])


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(svc: Service = Depends(get_service)):
    """Prometheus text format: requests by status, queue and batch size, tokens, latencies, speculation."""
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat():
    return HTMLResponse(chat_page())
