"""POST /v1/features/fetch and /v1/features/write.

Each is one function of the raw ASGI call (`fetch_reply`, `write_reply`): the fast path (routers/fast_path.py)
calls it straight from the server, and the FastAPI route declared here calls the same function for requests
the fast path leaves to the full stack (browsers' CORS) and documents it in the OpenAPI spec.
"""

from __future__ import annotations

import time

import msgspec
from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers
from starlette.types import Receive, Scope

from app.serving.fetch import serve
from app.serving.request import FetchRequest as Fetch
from app.serving.request import WriteRequest as Write
from app.serving.write import write
from routers.admission import DEADLINE, NOT_A_SAMPLE, RECEIVED
from routers.answers import MSGPACK, Reply, encode_fetch, timing_of, trace_header, wants_msgpack
from routers.decode import decode_body, receive_body
from routers.deps import authorize_scope, security
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


async def fetch_reply(scope: Scope, receive: Receive) -> Reply:
    started = time.perf_counter()
    state = scope["app"].state
    key = authorize_scope(state.keyring, scope, "read")
    gateway = state.gateway
    with gateway.server_span("POST /v1/features/fetch", Headers(scope=scope)) as span:
        body = decode_body(await receive_body(scope, receive, state.max_body_bytes), Fetch)
        deadline_ms = body.deadline_ms
        if deadline_ms is None and body.service is not None:  # a service's own deadline, when it has one
            service = gateway.registry.services.get(body.service)
            deadline_ms = None if service is None else service.deadline_ms
        if deadline_ms is not None:  # what the admission limit aims under (routers/admission.py)
            scope[DEADLINE] = deadline_ms / 1000
        served = await serve(
            gateway,
            body,
            None if key is None else key.groups,
            scope.get(RECEIVED),
            None if key is None else key.name,
        )
        span.set_attribute("degraded", served.degraded)
        if served.degraded:
            scope[NOT_A_SAMPLE] = True
        binary = wants_msgpack(scope)
        content = encode_fetch(served, binary)
    total_ms = (time.perf_counter() - started) * 1000
    headers = [(b"server-timing", timing_of(served, total_ms).encode()), *trace_header(span)]
    return Reply(content, MSGPACK if binary else b"application/json", headers)


async def write_reply(scope: Scope, receive: Receive) -> Reply:
    state = scope["app"].state
    key = authorize_scope(state.keyring, scope, "write")
    gateway = state.gateway
    with gateway.server_span("POST /v1/features/write", Headers(scope=scope)) as span:
        body = decode_body(await receive_body(scope, receive, state.max_body_bytes), Write)
        written = await write(gateway, body, None if key is None else key.groups)
    return Reply(msgspec.json.encode(written), b"application/json", trace_header(span))


@router.post(
    "/fetch",
    response_model=FetchResponse,
    operation_id="fetch_features",
    tags=["features"],
    summary="Fetch features of entities",
    description="With `Accept: application/msgpack` the same document comes as MessagePack "
    "(content-type application/msgpack): no float text to write or parse, the cheaper answer for large batches.",
    responses={
        200: {"content": {"application/msgpack": {"schema": {"$ref": "#/components/schemas/FetchResponse"}}}},
        **problems(
            status_503="strict was asked and a backend failed, or the worker is overloaded (type overload, with "
            "Retry-After; nothing was read)"
        ),
    },
    openapi_extra={**json_body(FetchRequest), **security("read")},
)
async def fetch_features(request: Request) -> Response:
    return (await fetch_reply(request.scope, request.receive)).response()


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
    return (await write_reply(request.scope, request.receive)).response()
