"""The composition root of the server: the app factory and its lifespan, which owns every backend connection.

It alone turns settings into what the parts take (limits, policies, the key ring, the tracer). Nothing is
opened at import: `create_app()` reads and validates the registry and the API keys (a bad one
fails here, before the port is bound); the lifespan opens backends, migrates them, and closes them in reverse
on shutdown. Both files are reread on SIGHUP or POST /v1/admin/reload (app/reloading.py).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from opentelemetry.sdk.trace.export import SpanExporter

from app.auth import KeyRing, load_keys
from app.metrics import Metrics
from app.registry.load import load_registry
from app.registry.model import Registry
from app.reloading import ConfigFiles, Reloader, on_sighup, reload_on_signal
from app.serving.gateway import Gateway
from app.settings import Settings
from app.telemetry import make_tracing
from app.tiering.cost import CostMeter
from backends import open_backend
from routers import admin, cost, events, feast, features, health, observability, services, status
from routers import registry as registry_routes
from routers.admission import ADMISSION, AdmissionControl
from routers.errors import install_error_handlers
from routers.fast_path import GatewayApp
from routers.models import add_request_schemas
from routers.observability import RequestMetrics, documented_paths

log = logging.getLogger(__name__)

DEMO_REGISTRY = Path(__file__).parent / "demo" / "registry.yaml"
IN_PROCESS_SWITCH_INTERVAL_S = 0.001


def create_app(
    settings: Settings | None = None,
    *,
    registry: Registry | None = None,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    settings = settings or Settings()
    # What a reload rereads: the file start-up read; a registry handed in (tests) is reloaded from settings.registry
    # if that is set, else not at all
    path = settings.registry or (DEMO_REGISTRY if registry is None else None)
    files = ConfigFiles(path, settings.api_keys, settings.api_keys_file, os.environ)
    fingerprint = None  # of the files as loaded here (None: a registry handed in)
    if registry is None:
        fingerprint = files.fingerprint()  # first, as ConfigFiles.load does
        registry = load_registry(settings.registry or DEMO_REGISTRY, os.environ)
    keyring = load_keys(settings.api_keys, settings.api_keys_file, registry)
    demo = settings.registry is None and registry.source == str(DEMO_REGISTRY)
    tracing = make_tracing(settings, span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        backends = {name: open_backend(spec, registry) for name, spec in registry.backends.items()}
        gateway = Gateway(
            registry,
            backends,
            limits=settings.limits(),
            breaker_policy=settings.breaker_policy(),
            lifecycle=settings.lifecycle(),
            metrics=Metrics(settings.metrics_dir),
            tracing=tracing,
            admission=settings.admission_policy(),
            local_cache=settings.local_cache(),
        )
        if keyring.enabled:
            log.info("API keys: %d configured (%s)", len(keyring.keys), keyring.source)
        else:
            log.warning(
                "authentication is off: no API keys configured (GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE); "
                "anyone who can reach this port can read and write every feature"
            )

        def use_keys(keys: KeyRing) -> None:
            app.state.keyring = keys  # routers/deps.py reads it on each request

        reloader = Reloader(
            files,
            gateway,
            open_backend,
            use_keys,
            keys=keyring,
            fingerprint=fingerprint,
            supervisor_pid=settings.supervisor_pid,
        )
        app.state.reloader = reloader
        restore_sighup: Callable[[], None] | None = None
        try:
            await gateway.start()
            if demo:
                from app.demo.seed import seed_demo

                await seed_demo(gateway)
            app.state.gateway = gateway
            if settings.freeze_heap:
                # What start-up built lives as long as the process: out of the collector's way, so a full
                # collection walks only what requests allocate. Its pauses stop the event loop for everyone
                # (README's locust line on the demo: 0.2% of fetches degraded at the 100 ms deadline, none
                # with this and the switch interval below).
                gc.collect()
                gc.freeze()
            if any(backend.in_process for backend in backends.values()) or (tracing and tracing.threaded):
                # Threads of ours run Python beside the event loop: an in-process backend's reads, which need
                # the GIL back from a busy loop to hand their rows over, and span export, which encodes a
                # batch for milliseconds. At the default 5 ms each side waits that long for the other's turn.
                sys.setswitchinterval(IN_PROCESS_SWITCH_INTERVAL_S)
            # Once started: a reload swaps what start() sets up. (Until now `serve` ignores SIGHUP, and its
            # supervisor of several workers sends it only to workers that are ready.)
            restore_sighup = on_sighup(lambda: gateway.spawn(reload_on_signal(reloader), name="reload"))
            if fingerprint is not None and files.fingerprint() != fingerprint:
                # The files changed while this worker started, when a SIGHUP found no handler to reload them
                gateway.spawn(reload_on_signal(reloader), name="reload")
            # Lifespan state reaches every request's scope, and uvicorn's protocol (routers/admission.py).
            yield {ADMISSION: gateway.admission}
        finally:
            await app.state.costs.aclose()  # a measurement left running by a client that went away
            if restore_sighup is not None:
                restore_sighup()
            await gateway.aclose()
            log.info("closed backends %s", ", ".join(reversed(gateway.backends)))
            if tracing is not None:
                tracing.shutdown()

    app = GatewayApp(
        title="feature-gateway",
        version="1.0.0",
        summary="One endpoint for ML features from Redis, CockroachDB and SQLite, with defaults and statuses",
        lifespan=lifespan,
    )
    app.state.keyring = keyring
    app.state.costs = CostMeter()  # the cost report's measurements, kept a minute (routers/cost.py)
    app.state.max_body_bytes = settings.max_body_bytes  # routers read bodies up to it
    install_error_handlers(app)
    routers = (features, registry_routes, services, events, health, observability, feast, status, cost, admin)
    for module in routers:
        app.include_router(module.router)
    # The paths requests are counted by (RequestMetrics); from the routers, as the spec's paths are: generating
    # the spec for them cost a worker's first request 0.2-0.4 s of CPU, with the event loop held.
    app.state.route_labels = documented_paths(module.router for module in routers)
    # Served ahead of FastAPI's router and middleware (routers/fast_path.py), by the functions its routes call
    app.fast_routes.update(
        {
            "/v1/features/fetch": features.fetch_reply,
            "/v1/features/write": features.write_reply,
            "/get-online-features": feast.feast_fetch_reply,
            "/write-to-online-store": feast.feast_write_reply,
        }
    )
    # Inside RequestMetrics, so its refusals are counted by route (those at the door, under `serve`, are counted
    # in feature_gateway_requests_shed_total only: they never reach the app).
    app.add_middleware(AdmissionControl)
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
