"""POST /v1/features/fetch and /v1/features/write."""

from __future__ import annotations

import time

import msgspec
from fastapi import APIRouter, Request, Response

from app.serving.fetch import serve
from app.serving.request import FetchRequest as Fetch
from app.serving.request import WriteRequest as Write
from app.serving.write import write
from routers.admission import DEADLINE, NOT_A_SAMPLE, RECEIVED
from routers.answers import encode_fetch, timing_of, with_trace
from routers.decode import decode_body, read_body
from routers.deps import authorize, gateway_of, security
from routers.models import (
    FetchRequest,
    FetchResponse,
    WriteRequest,
    WriteResponse,
    json_body,
    problems,
)
from routers.raw_route import RawRoute

router = APIRouter(prefix="/v1/features", route_class=RawRoute)


@router.post(
    "/fetch",
    response_model=FetchResponse,
    operation_id="fetch_features",
    tags=["features"],
    summary="Fetch features of entities",
    responses=problems(
        status_503="strict was asked and a backend failed, or the worker is overloaded (type overload, with "
        "Retry-After; nothing was read)"
    ),
    openapi_extra={**json_body(FetchRequest), **security("read")},
)
async def fetch_features(request: Request) -> Response:
    started = time.perf_counter()
    key = authorize(request, "read")
    gateway = gateway_of(request)
    limit = request.app.state.max_body_bytes
    with gateway.server_span("POST /v1/features/fetch", request.headers) as span:
        body = decode_body(await read_body(request, limit), Fetch)
        deadline_ms = body.deadline_ms
        if deadline_ms is None and body.service is not None:  # a service's own deadline, when it has one
            service = gateway.registry.services.get(body.service)
            deadline_ms = None if service is None else service.deadline_ms
        if deadline_ms is not None:  # what the admission limit aims under (routers/admission.py)
            request.scope[DEADLINE] = deadline_ms / 1000
        served = await serve(
            gateway,
            body,
            None if key is None else key.groups,
            request.scope.get(RECEIVED),
            None if key is None else key.name,
        )
        span.set_attribute("degraded", served.degraded)
        if served.degraded:
            request.scope[NOT_A_SAMPLE] = True
        content = encode_fetch(served)
    total_ms = (time.perf_counter() - started) * 1000
    headers = {"Server-Timing": timing_of(served, total_ms)}
    return Response(content=content, media_type="application/json", headers=with_trace(headers, span))


@router.post(
    "/write",
    response_model=WriteResponse,
    operation_id="write_features",
    tags=["features"],
    summary="Write feature values of one group",
    responses=problems(
        status_503="the group's backend did not answer, or the worker is overloaded (type overload, with "
        "Retry-After; nothing was written)"
    ),
    openapi_extra={**json_body(WriteRequest), **security("write")},
)
async def write_features(request: Request) -> Response:
    key = authorize(request, "write")
    gateway = gateway_of(request)
    limit = request.app.state.max_body_bytes
    with gateway.server_span("POST /v1/features/write", request.headers) as span:
        body = decode_body(await read_body(request, limit), Write)
        written = await write(gateway, body, None if key is None else key.groups)
    return Response(content=msgspec.json.encode(written), media_type="application/json", headers=with_trace({}, span))
