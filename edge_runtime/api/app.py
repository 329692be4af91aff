"""The FastAPI app: thin routers over the serving layer.

    GET  /healthz               200 while the process is alive
    GET  /readyz                200 once the model is loaded and warmed up, else 503
                                (also 503, status "drained", while the fleet has drained it);
                                model, version and load error only to an authenticated caller
                                (or to all when no credentials are configured)
    GET  /docs /redoc /openapi.json   only with server.docs = true (behind the API key)
    GET  /metrics               Prometheus text
    GET  /v1/models             the one served model (`bundle.manifest.name`, its version)
    GET  /v1/models/{model}
    POST /v1/chat/completions   JSON or SSE (`stream: true`)
    POST /v1/completions        JSON or SSE

The app's lifespan starts and stops the worker (and the fleet agent, when `app.state.fleet`
holds one), so whoever runs the app (the CLI, a test's uvicorn thread) gets loading, warm-up
and a clean shutdown without extra calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from edge_runtime.api import schemas as s
from edge_runtime.api.accesslog import AccessLog
from edge_runtime.api.auth import Authenticator
from edge_runtime.api.completions import ServingState, create_completion
from edge_runtime.api.errors import APIError, install_handlers
from edge_runtime.api.guard import GuardMiddleware, allowed_hosts
from edge_runtime.api.metrics import Metrics
from edge_runtime.api.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
    authenticated,
)
from edge_runtime.config import Config
from edge_runtime.offload.client import OffloadClient
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo


def create_app(
    worker: LocalWorker,
    model: ModelInfo,
    config: Config | None = None,
    access_log: AccessLog | None = None,
    offload: OffloadClient | None = None,
) -> FastAPI:
    """An app serving `model` through `worker` (started and stopped by the app's lifespan)."""
    config = config or Config()
    metrics = Metrics()
    if worker.model is None:
        worker.model = model
    metrics.track_queue(lambda: worker.depth, lambda: worker.ready, lambda: worker.prefilling)
    metrics.track_prefix_cache(lambda: worker.prefix_cache)
    metrics.track_rates(worker.estimates)
    metrics.track_capacity(lambda: worker.capacity, lambda: worker.scheduler.max_queue)
    if offload is not None:
        metrics.track_offload(offload.available)
    state = ServingState(
        worker=worker,
        model=model,
        metrics=metrics,
        retry_after_s=1,
        offload=offload,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # `app.state.fleet` (fleet_serving.FleetServing): the device agent, when the daemon
        # runs one; it starts once the model is warm and stops before the worker does.
        fleet = getattr(app.state, "fleet", None)
        worker.start()
        if fleet is not None:
            fleet.start()
        try:
            yield
        finally:
            if fleet is not None:
                await asyncio.to_thread(fleet.stop)  # a clean MQTT goodbye takes a moment
            worker.stop()

    docs = config.server.docs  # off by default: the schema is a map for an attacker
    app = FastAPI(
        title="edge-runtime",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.serving = state
    app.state.metrics = metrics
    install_handlers(app)
    auth = Authenticator.from_config(config.server)  # ConfigError names a bad key file
    app.include_router(_health_router(state, open_api=auth is None))
    app.include_router(_v1_router(state))
    # add_middleware wraps: the last one added is the outermost.
    app.add_middleware(BodyLimitMiddleware, limit=config.server.max_body_bytes)
    if auth is not None:
        docs_paths = ("/docs", "/redoc", "/openapi.json") if docs else ()
        app.add_middleware(AuthMiddleware, auth=auth, protected=("/v1", "/metrics", *docs_paths))
    app.add_middleware(
        GuardMiddleware,
        hosts=allowed_hosts(config.server),
        origins=frozenset(config.server.cors_origins),
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics, access_log=access_log)
    return app


def _health_router(state: ServingState, open_api: bool) -> APIRouter:
    """`open_api`: no credentials are configured, so every caller may see what /v1/models
    shows anyway; else /readyz details (model, version, load error) need credentials."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        worker = state.worker
        details = open_api or authenticated(request.scope) is not None
        if worker.ready:
            m = state.current_model()
            # Drained: up, but a load balancer must send new work elsewhere.
            status = "drained" if worker.drained else "ready"
            body: dict[str, Any] = {"status": status}
            if details:
                body.update(model=m.name, version=m.version)
            return JSONResponse(body, status_code=503 if worker.drained else 200)
        if worker.error is not None:
            body = {"status": "failed"}
            if details:
                body["error"] = str(worker.error)
        else:
            body = {"status": "loading"}
        return JSONResponse(body, status_code=503)

    @router.get("/metrics")
    async def metrics() -> Response:
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    return router


def _v1_router(state: ServingState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    def card() -> s.ModelCard:  # read per request: a fleet deploy swaps the model
        m = state.current_model()
        return s.ModelCard(id=m.name, created=m.created, version=m.version)

    @router.get("/models")
    async def list_models() -> s.ModelList:
        return s.ModelList(data=[card()])

    @router.get("/models/{model:path}")
    async def get_model(model: str) -> s.ModelCard:
        if model != card().id:
            raise APIError(
                404, f"model '{model}' does not exist", param="model", code="model_not_found"
            )
        return card()

    @router.post("/chat/completions")
    async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
        return await create_completion(request, body, state)

    @router.post("/completions")
    async def completions(body: s.CompletionRequest, request: Request) -> Response:
        return await create_completion(request, body, state)

    return router
