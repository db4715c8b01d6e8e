"""The app factory and its lifespan, which owns every backend connection.

Nothing is opened at import: `create_app()` reads and validates the registry and the API keys (a bad one
fails here, before the port is bound); the lifespan opens backends, migrates them, and closes them in reverse
on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.auth import load_keys
from app.errors import GatewayError
from app.gateway import Gateway
from app.registry import Registry, load_registry
from app.settings import Settings
from app.telemetry import make_tracer_provider, tracer_for
from backends import open_backend
from routers import feast, features, health, observability, status
from routers import registry as registry_routes
from routers.models import add_request_schemas
from routers.observability import RequestMetrics

log = logging.getLogger(__name__)

DEMO_REGISTRY = Path(__file__).parent / "demo" / "registry.yaml"
PROBLEM = "application/problem+json"


def problem_response(status: int, title: str, detail: str, field: str | None = None) -> JSONResponse:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.problem(), status_code=exc.status, media_type=PROBLEM, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"]) or None
        return problem_response(422, "Invalid request", str(first["msg"]), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = problem_response(exc.status_code, str(exc.detail), str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up mid-body (a load generator stopping, a caller's own timeout): nobody reads this.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error", "the gateway failed to answer; this is a bug, it was logged")


def create_app(
    settings: Settings | None = None,
    *,
    registry: Registry | None = None,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    settings = settings or Settings()
    if registry is None:
        registry = load_registry(settings.registry or DEMO_REGISTRY)
    keyring = load_keys(settings, registry)
    demo = settings.registry is None and registry.source == str(DEMO_REGISTRY)
    provider = make_tracer_provider(settings, span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = {name: open_backend(spec, registry) for name, spec in registry.backends.items()}
        gateway = Gateway(settings, registry, backends, tracer_for(provider))
        if keyring.enabled:
            log.info("API keys: %d configured (%s)", len(keyring.keys), keyring.source)
        else:
            log.warning(
                "authentication is off: no API keys configured (GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE); "
                "anyone who can reach this port can read and write every feature"
            )
        try:
            await gateway.start()
            if demo:
                from app.demo.seed import seed_demo

                await seed_demo(gateway)
            app.state.gateway = gateway
            yield
        finally:
            await gateway.aclose()
            log.info("closed backends %s", ", ".join(reversed(gateway.backends)))
            if provider is not None:
                provider.shutdown()

    app = FastAPI(
        title="feature-gateway",
        version="1.0.0",
        summary="One endpoint for ML features from Redis, CockroachDB and SQLite, with defaults and statuses",
        lifespan=lifespan,
    )
    app.state.keyring = keyring
    install_error_handlers(app)
    app.include_router(features.router)
    app.include_router(registry_routes.router)
    app.include_router(health.router)
    app.include_router(observability.router)
    app.include_router(feast.router)
    app.include_router(status.router)
    app.add_middleware(RequestMetrics)
    if settings.cors_origins:
        # Outermost, so a preflight is answered before authentication (browsers send no credentials with it).
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "traceparent", "tracestate", "baggage"],
            expose_headers=["server-timing", "x-feature-gateway-degraded", "traceresponse"],
            max_age=600,
        )
    install_openapi(app)
    return app


def install_openapi(app: FastAPI) -> None:
    """FastAPI's spec plus the request schemas of routes that read raw bodies (see routers.models.json_body)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = add_request_schemas(spec)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
