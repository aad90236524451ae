"""GET /v1/models, /v1/models/{id}; GET /health; GET /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hanlin.apps.server.errors import APIError

router = APIRouter()


def _card(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "hanlin",
            "context_length": state.llm.engine.context_length, "engine": state.llm.engine.name}  # fmt: skip


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_card(request.app.state.hanlin)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = request.app.state.hanlin
    if model_id != state.model_name:
        raise APIError(404, f"model {model_id!r} is not served here; this server serves {state.model_name!r}", param="model", code="model_not_found")
    return _card(state)


health_router = APIRouter()


@health_router.get("/health")
async def health(request: Request):
    state = request.app.state.hanlin
    alive = state.scheduler._thread.is_alive()
    return JSONResponse({"status": "ok" if alive else "scheduler stopped", "model": state.model_name, **state.scheduler.stats()},
                        status_code=200 if alive else 503)  # fmt: skip


@health_router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.hanlin.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
