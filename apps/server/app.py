"""The FastAPI app: state, middleware (body size, API keys, CORS, request counts), routers."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from hanlin.apps.server import agents, chat, completions, embeddings, errors, kb, models
from hanlin.apps.server.errors import APIError
from hanlin.apps.server.metrics import Metrics
from hanlin.apps.server.scheduler import Scheduler
from hanlin.apps.server.settings import ServerSettings

log = logging.getLogger("hanlin.server")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/kb/search", "/v1/kb/ask", "/v1/agents/runs", "/v1/models", "/health", "/metrics")  # counted by name in /metrics


@dataclass
class State:
    settings: ServerSettings
    llm: Any
    scheduler: Scheduler
    metrics: Metrics
    model_name: str
    started: int
    template_reads_tools: bool
    embedder: Any = None  # embeddings.Embedder when --embedding-model is set
    kb: Any = None  # kb.ServedKB when --kb is set

    @property
    def default_config(self):
        return self.llm.config

    def check_model(self, name: str) -> None:
        if name != self.model_name and name not in ("default", ""):
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_name!r}", param="model", code="model_not_found")


def load_llm(settings: ServerSettings) -> Any:
    """The model, on the torch engine where it can run it (continuous batching), else the
    engine hanlin would pick: one request at a time then."""
    import hanlin

    opts: dict[str, Any] = {"ctx_size": settings.ctx_size} if settings.ctx_size else {}
    if settings.engine:
        extra = {"dtype": settings.dtype} if settings.engine == "torch" else {}
        return hanlin.load(settings.model, device=settings.device, engine=settings.engine, **opts, **extra)
    try:
        return hanlin.load(settings.model, device=settings.device, engine="torch", dtype=settings.dtype, **opts)
    except Exception as e:  # noqa: BLE001  (torch missing, an architecture it lacks: fall back, and say so)
        log.warning("torch engine unavailable (%s); serving one request at a time", str(e).splitlines()[0])
        return hanlin.load(settings.model, device=settings.device, **opts)


def create_app(settings: ServerSettings | None = None, llm: Any = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()
    scheduler = Scheduler(max_batch=settings.max_concurrent, queue_size=settings.queue_size, metrics=metrics)
    given = llm
    llm = scheduler.start(lambda: given or load_llm(settings))  # the model is loaded on, and only used from, the scheduler's thread
    state = State(settings, llm, scheduler, metrics, settings.served_model_name or llm.name, int(time.time()), llm.template_reads_tools)
    if settings.embedding_model:
        from hanlin.embeddings import MINILM, Embedder, resolve_embedding_model

        folder = resolve_embedding_model(settings.embedding_model)
        name = MINILM if not os.path.isdir(settings.embedding_model) else os.path.basename(folder.rstrip("/"))
        state.embedder = scheduler.call(lambda: Embedder(folder, name)).result()  # loaded on the model thread, like the model
    if settings.kb:
        state.kb = scheduler.call(lambda: kb.ServedKB(settings.kb, state.embedder)).result()  # its embedder too

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="hanlin", version="0.1", lifespan=lifespan)
    app.state.hanlin = state
    errors.install(app)
    app.include_router(models.router)
    app.include_router(models.health_router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(embeddings.router)
    app.include_router(kb.router)
    app.include_router(agents.router)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Guard, state=state)
    return app


class Guard:
    """Outermost checks, before any body is parsed: API key (constant-time compare; keys are
    never logged), body size (413 past max_body_bytes, also when no Content-Length is sent),
    and request counts by endpoint and status for /metrics."""

    def __init__(self, app: ASGIApp, state: State):
        self.app, self.state = app, state
        self.keys = [k.encode() for k in state.settings.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status_seen = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
            await send(message)

        try:
            if self.keys and path.startswith("/v1") and scope["method"] != "OPTIONS" and not self._authorized(scope):
                return await _reply(counting_send, 401, "invalid API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
            limit = self.state.settings.max_body_bytes
            declared = _header(scope, b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                return await _reply(counting_send, 413, f"request body over the {limit}-byte limit", code="body_too_large")
            seen = 0

            async def limited_receive() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:  # answered in OpenAI's shape by the app's APIError handler
                        raise APIError(413, f"request body over the {limit}-byte limit", code="body_too_large")
                return message

            await self.app(scope, limited_receive, counting_send)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status_seen["code"])).inc()

    def _authorized(self, scope: Scope) -> bool:
        given = _header(scope, b"authorization") or ""
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        ok = False
        for key in self.keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(token, key)
        return ok


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _reply(send: Send, status: int, message: str, *, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(settings: ServerSettings) -> None:
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
