"""POST /v1/events/{stream}: events in, sliding-window aggregates out (app/streams)."""

from __future__ import annotations

import time

import msgspec
from fastapi import APIRouter, Request, Response

from app.errors import Forbidden, ValidationFailed
from app.streams.ingest import EventsRequest as Events
from app.streams.ingest import aggregation_groups, ingest, parse_events
from routers.answers import with_trace
from routers.decode import decode_body, read_body
from routers.deps import authorize, gateway_of, security
from routers.models import EventsRequest, EventsResponse, json_body, problems
from routers.raw_route import RawRoute

router = APIRouter(prefix="/v1/events", route_class=RawRoute)


@router.post(
    "/{stream}",
    response_model=EventsResponse,
    operation_id="post_events",
    tags=["features"],
    summary="Send events of a stream: its aggregation groups' windows count them",
    responses=problems(
        status_503="an aggregation group's backend did not answer (nothing of that group was stored; resending "
        "is safe: an event counts once, by its id)"
    ),
    openapi_extra={**json_body(EventsRequest), **security("write")},
)
async def post_events(request: Request) -> Response:
    key = authorize(request, "write")
    gateway = gateway_of(request)
    name = request.path_params["stream"]
    stream = gateway.registry.streams.get(name)
    if key is not None and key.groups is not None:
        # A limited key: an unknown stream and one it may not feed look alike, and no name is listed
        groups = aggregation_groups(gateway.registry, name)
        if stream is None or not all(g.name in key.groups for g in groups):
            raise Forbidden(f"this API key may not send events of stream {name!r}", field="stream")
    if stream is None:
        known = ", ".join(gateway.registry.streams) or "none"
        raise ValidationFailed(f"unknown stream {name!r}; streams: {known}", field="stream")
    started = time.perf_counter()
    with gateway.server_span("POST /v1/events/{stream}", request.headers) as span:
        body = decode_body(await read_body(request, request.app.state.max_body_bytes), Events)
        events = parse_events(stream, body.events, gateway.limits)
        ingested = await ingest(gateway, stream, events)
    # Event to servable, for events sent over HTTP: their tiles are stored when the answer leaves
    gateway.metrics.ingested(
        stream.name, time.perf_counter() - started, ingested.accepted, ingested.duplicates, ingested.late
    )
    return Response(content=msgspec.json.encode(ingested), media_type="application/json", headers=with_trace({}, span))
