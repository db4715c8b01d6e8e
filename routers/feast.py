"""POST /get-online-features: Feast's feature-server endpoint, so Feast clients only change their URL."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import Receive, Scope

from app.serving.fetch import plan_for, serve
from app.serving.write import write
from routers.admission import NOT_A_SAMPLE, RECEIVED
from routers.answers import Reply, timing_of, trace_header
from routers.decode import decode_body, receive_body
from routers.deps import authorize_scope, security
from routers.feast_protocol import FeastBody, FeastWriteBody, encode_answer, fetch_request, write_request
from routers.models import WriteResponse, json_body, problems
from routers.raw_route import RawRoute

router = APIRouter(route_class=RawRoute)


class FeastRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "features": ["consumer_live:orders_7d", "consumer_history:lifetime_value"],
                    "entities": {"consumer_id": [101, 106]},
                    "full_feature_names": False,
                }
            ]
        }
    )

    features: list[str] = Field(description="`feature_view:feature` references (our groups are Feast's views)")
    entities: dict[str, list[int | str]]
    full_feature_names: bool = Field(False, description="Name columns `view__feature` instead of `feature`")


class FeastColumn(BaseModel):
    values: list[Any]
    statuses: list[str] = Field(description="PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE or INVALID (backend failed)")
    event_timestamps: list[str]


class FeastMetadata(BaseModel):
    feature_names: list[str]


class FeastResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "metadata": {"feature_names": ["consumer_id", "orders_7d", "lifetime_value"]},
                    "results": [
                        {
                            "values": [101, 106],
                            "statuses": ["PRESENT", "PRESENT"],
                            "event_timestamps": ["1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"],
                        },
                        {
                            "values": [3, 0],
                            "statuses": ["PRESENT", "NOT_FOUND"],
                            "event_timestamps": ["2026-11-26T10:00:00Z", "1970-01-01T00:00:00Z"],
                        },
                        {
                            "values": [402.5, 0.0],
                            "statuses": ["PRESENT", "NOT_FOUND"],
                            "event_timestamps": ["2026-11-26T10:00:00Z", "1970-01-01T00:00:00Z"],
                        },
                    ],
                }
            ]
        }
    )

    metadata: FeastMetadata
    results: list[FeastColumn]


@router.post(
    "/get-online-features",
    response_model=FeastResponse,
    operation_id="get_online_features_feast",
    tags=["feast"],
    summary="Feast-compatible fetch (columnar results, Feast status names)",
    responses=problems(),
    openapi_extra={**json_body(FeastRequest), **security("read")},
)
async def feast_get_online_features(request: Request) -> Response:
    return (await feast_fetch_reply(request.scope, request.receive)).response()


async def feast_fetch_reply(scope: Scope, receive: Receive) -> Reply:
    """The route's function of the raw call, which the fast path (routers/fast_path.py) also serves."""
    started = time.perf_counter()
    state = scope["app"].state
    key = authorize_scope(state.keyring, scope, "read")
    gateway = state.gateway
    with gateway.server_span("POST /get-online-features", Headers(scope=scope)) as span:
        raw = await receive_body(scope, receive, state.max_body_bytes, untyped_ok=True)
        feast = decode_body(raw, FeastBody)
        groups = None if key is None else key.groups
        served = await serve(
            gateway,
            fetch_request(feast, lambda fetch: plan_for(gateway, fetch, groups)),
            groups,
            scope.get(RECEIVED),
            None if key is None else key.name,
        )
        if served.degraded:
            scope[NOT_A_SAMPLE] = True
        body = encode_answer(feast, served)
    total_ms = (time.perf_counter() - started) * 1000
    headers = [
        (b"server-timing", timing_of(served, total_ms).encode()),
        # Feast's shape has no place for it; a client that cares can read it here.
        (b"x-feature-gateway-degraded", b"true" if served.degraded else b"false"),
        *trace_header(span),
    ]
    return Reply(body, b"application/json", headers)


class FeastWriteRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "feature_view_name": "store_stats",
                    "df": {
                        "store_id": ["s-1"],
                        "prep_time_p50": [12.5],
                        "open_orders": [4],
                        "event_timestamp": ["2026-11-26T10:00:00"],
                        "created": [None],
                    },
                    "allow_registry_cache": False,
                }
            ]
        }
    )

    feature_view_name: str = Field(description="The group to write")
    df: dict[str, list[Any]] = Field(description="Columns: the join key, every feature, event_timestamp")
    allow_registry_cache: bool = True


@router.post(
    "/write-to-online-store",
    response_model=WriteResponse,
    operation_id="write_to_online_store_feast",
    tags=["feast"],
    summary="Feast-compatible write (columnar), through the same validated write path",
    responses=problems(status_503="the group's backend did not answer"),
    openapi_extra={**json_body(FeastWriteRequest), **security("write")},
)
async def feast_write_to_online_store(request: Request) -> Response:
    return (await feast_write_reply(request.scope, request.receive)).response()


async def feast_write_reply(scope: Scope, receive: Receive) -> Reply:
    state = scope["app"].state
    key = authorize_scope(state.keyring, scope, "write")
    gateway = state.gateway
    with gateway.server_span("POST /write-to-online-store", Headers(scope=scope)) as span:
        raw = await receive_body(scope, receive, state.max_body_bytes, untyped_ok=True)
        rows = write_request(decode_body(raw, FeastWriteBody))
        written = await write(gateway, rows, None if key is None else key.groups, via="feast")
    return Reply(msgspec.json.encode(written), b"application/json", trace_header(span))
