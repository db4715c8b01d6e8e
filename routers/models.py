"""Pydantic models that document the API in the OpenAPI spec (and so in generated SDKs).

The hot path does not build these: bodies are decoded by `routers/decode.py` into `app/serving/request.py`'s
types and answers encoded once as bytes; tests check that what is served validates against these models.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from app.resilience.breaker import CircuitState
from app.serving.statuses import Outcome, Status

# The spec spells these closed sets out inline, as it always has (an enum type would become a named schema and
# change every generated SDK); they are the enums' values, which the checks below hold them to.
StatusName = Literal["PRESENT", "MISSING", "EXPIRED", "UNAVAILABLE"]
OutcomeName = Literal["ok", "error", "timeout", "open"]
CircuitName = Literal["closed", "open", "half_open"]
for _names, _enum in ((StatusName, Status), (OutcomeName, Outcome), (CircuitName, CircuitState)):
    if get_args(_names) != tuple(_enum):
        raise AssertionError(f"{_enum.__name__}'s values and the spec's names differ: {get_args(_names)}")


class FetchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "entities": {"consumer_id": [101, 102]},
                    "features": ["consumer_live:orders_7d", "consumer_history:*"],
                    "deadline_ms": 50,
                    "include_timestamps": False,
                },
                {
                    "entities": {"consumer_id": [101]},
                    "service": "eta_model_v3",
                    "context": {"basket_value": [23.5]},
                },
            ]
        },
    )

    entities: dict[str, list[int | str]] = Field(
        description="Join key -> ids; one row per position. Every join key the features need, same length each."
    )
    features: list[str] | None = Field(
        None,
        description="`group:feature`, `group:*` (all of a group, in registry order), or an on-demand feature "
        "(`name` for all its outputs, `name:output`). Give this or `service`, not both.",
    )
    service: str | None = Field(
        None,
        description="A feature service (a model) by name: its features in its order, with its defaults, max_age "
        "and deadline (GET /v1/services). Give this or `features`, not both.",
    )
    context: dict[str, list[Any]] | None = Field(
        None,
        description="Request fields the on-demand features read (their `request` in the registry): field -> one "
        "value per entity row",
    )
    deadline_ms: float | None = Field(None, gt=0, description="Answer within this; slower backends are UNAVAILABLE")
    include_timestamps: bool = Field(False, description="Add event_timestamps per row")
    strict: bool = Field(False, description="503 instead of a degraded answer when a backend fails")


class FetchRow(BaseModel):
    entity: dict[str, int | str]
    values: list[Any] = Field(description="values[i] answers features[i]; the declared default when not PRESENT")
    statuses: list[StatusName]
    event_timestamps: list[str | None] | None = Field(None, description="RFC 3339; null where not PRESENT")


class BackendReport(BaseModel):
    status: OutcomeName = Field(
        description="open: the backend's circuit is open after repeated failures, so it was not asked"
    )
    ms: float
    error: str | None = None


class TransformReport(BaseModel):
    status: Literal["ok", "error"] = Field(
        description="error: the function raised, or answered the wrong outputs, length or dtype; its outputs "
        "are UNAVAILABLE with their defaults and the answer is degraded"
    )
    ms: float
    error: str | None = None


class FetchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "features": ["consumer_live:orders_7d", "consumer_history:lifetime_orders"],
                    "rows": [
                        {"entity": {"consumer_id": 101}, "values": [3, 17], "statuses": ["PRESENT", "PRESENT"]},
                        {"entity": {"consumer_id": 102}, "values": [0, 0], "statuses": ["EXPIRED", "MISSING"]},
                    ],
                    "backends": {"hot": {"status": "ok", "ms": 0.41}, "bulk": {"status": "ok", "ms": 1.2}},
                    "degraded": False,
                }
            ]
        }
    )

    features: list[str]
    rows: list[FetchRow]
    backends: dict[str, BackendReport]
    degraded: bool
    service: str | None = Field(None, description="The service asked for, when the request named one")
    transforms: dict[str, TransformReport] | None = Field(
        None, description="On-demand feature -> how its function went (only when the request had any)"
    )


class WriteRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "group": "consumer_live",
                    "rows": [
                        {
                            "consumer_id": 101,
                            "event_timestamp": "2026-11-26T10:00:00Z",
                            "orders_7d": 3,
                            "avg_basket": 23.5,
                            "is_active": True,
                            "embedding": [0.1, 0.2, 0.3, 0.4],
                        }
                    ],
                }
            ]
        },
    )

    group: str
    rows: list[dict[str, Any]] = Field(
        description="Each row: the join key, optional event_timestamp (RFC 3339), every feature (null = no value)"
    )


class WriteResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"group": "consumer_live", "written": 1, "skipped_stale": 0}]}
    )

    group: str
    written: int
    skipped_stale: int = Field(description="Rows older than what is stored (or than a later row of the batch)")


class EventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "event_id": "o-1",
                            "consumer_id": 101,
                            "ts": "2026-11-26T10:00:00Z",
                            "order_value": 23.5,
                            "cuisine": "thai",
                        }
                    ]
                }
            ]
        },
    )

    events: list[dict[str, Any]] = Field(
        description="Each event: `event_id` (a resent id counts once), the entity's join key, the stream's event-time "
        "field (RFC 3339 or epoch milliseconds), and its fields (null or absent: no value)"
    )


class EventCounts(BaseModel):
    accepted: int = Field(description="New events merged into the aggregates")
    duplicates: int = Field(description="Events whose id was seen before (or twice in the batch): counted once")
    late: int = Field(description="Events further behind than the group's allowed_lateness: dropped")


class EventsResponse(EventCounts):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "stream": "orders",
                    "accepted": 1,
                    "duplicates": 0,
                    "late": 0,
                    "groups": {"consumer_orders": {"accepted": 1, "duplicates": 0, "late": 0}},
                }
            ]
        }
    )

    stream: str
    groups: dict[str, EventCounts] = Field(description="Per aggregation group of the stream (the totals add them up)")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "https://feature-gateway.dev/problems/invalid-request",
                    "title": "Invalid request",
                    "status": 422,
                    "detail": "unknown feature 'x' in group consumer_live",
                    "field": "features[0]",
                }
            ]
        },
    )

    type: str
    title: str
    status: int
    detail: str
    field: str | None = None


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ready": False,
                    "backends": {"hot": "ok", "bulk": "ConnectionRefusedError: [Errno 111] Connect call failed"},
                    "circuits": {"hot": "closed", "bulk": "open"},
                    "write_circuits": {"hot": "closed", "bulk": "open"},
                    "detail": "not answering: bulk",
                }
            ]
        }
    )

    ready: bool
    backends: dict[str, str] = Field(description="Backend -> 'ok' or why it does not answer")
    circuits: dict[str, CircuitName] = Field(
        description="Backend -> read circuit state; open: fetches skip it until a probe succeeds"
    )
    write_circuits: dict[str, CircuitName] = Field(
        description="Backend -> write circuit state; open: writes are refused (503) until a probe succeeds. "
        "Failed writes never open the read circuit"
    )
    detail: str | None = Field(None, description="The backends that do not answer")


NAMED_SCHEMAS: dict[str, type[BaseModel]] = {"Problem": Problem}


def problems(**extra: str) -> dict[int | str, dict[str, Any]]:
    """Error responses of a route: 400, 401, 403, 413, 422 and any others given as `status_503="why"`.

    Declared as `application/problem+json` only (FastAPI's `model=` would also claim application/json),
    so generated clients parse them into a typed Problem."""
    texts = {
        "400": "Malformed body",
        "413": "Over a limit",
        "415": "The body is not declared `content-type: application/json`",
        "422": "Invalid field",
        **_AUTH_TEXTS,
    }
    texts.update({key.removeprefix("status_"): text for key, text in extra.items()})
    return _problem_responses(texts)


_AUTH_TEXTS = {
    "401": "No API key, or an unknown or malformed one (when keys are configured)",
    "403": "The API key lacks the scope or a feature group",
}


def _problem_responses(texts: dict[str, str]) -> dict[int | str, dict[str, Any]]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        int(code): {"description": text, "content": {"application/problem+json": {"schema": schema}}}
        for code, text in texts.items()
    }


# The errors of a route that takes an API key but no body.
AUTH_RESPONSES = _problem_responses(_AUTH_TEXTS)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a request body the route reads as raw bytes, by reference to a named schema
    (so generated SDKs call it `FetchRequest`, not `FetchFeaturesFetchRequest`); see `add_request_schemas`."""
    NAMED_SCHEMAS[model.__name__] = model
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_request_schemas(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the schemas routes refer to by name but FastAPI does not know of (raw bodies, problem+json)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, model in NAMED_SCHEMAS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return spec


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"]


class ServiceFeature(BaseModel):
    name: str = Field(description="The canonical ref: `group:feature` or `on_demand:output`")
    dtype: str
    default: Any = Field(
        description="What this service serves where the value is not PRESENT (for an on-demand output: where its "
        "function failed or gave no value; computed from defaulted inputs, it keeps the computed value)"
    )
    max_age_seconds: float | None = Field(None, description="Older values are EXPIRED for this service")


class ServiceDocument(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "eta_model_v3",
                    "description": "ETA model, v3",
                    "features": [
                        {"name": "consumer_live:orders_7d", "dtype": "int64", "default": 1, "max_age_seconds": 600.0},
                        {"name": "basket_ratio:basket_ratio", "dtype": "float64", "default": 1.0},
                    ],
                    "deadline_ms": 30.0,
                }
            ]
        }
    )

    name: str
    description: str
    features: list[ServiceFeature] = Field(description="In the order they are served")
    deadline_ms: float | None = Field(description="Used when a fetch gives no deadline_ms")


class ServiceList(BaseModel):
    services: list[ServiceDocument]


class RegistryDocument(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "backends": {"hot": {"type": "redis", "url": "redis://cache:6379/0", "key_prefix": "fg:"}},
                    "entities": {"consumer": {"join_key": "consumer_id", "dtype": "int64"}},
                    "groups": {
                        "consumer_live": {
                            "entity": "consumer",
                            "backend": "hot",
                            "ttl_seconds": 3600.0,
                            "expired_grace_seconds": 3600.0,
                            "description": "",
                            "features": {"orders_7d": {"dtype": "int64", "default": 0}},
                        }
                    },
                }
            ]
        }
    )

    backends: dict[str, dict[str, Any]] = Field(description="Backend -> type and options (passwords redacted)")
    entities: dict[str, dict[str, str]]
    groups: dict[str, dict[str, Any]] = Field(
        description="Group -> entity, backend, ttl_seconds, expired_grace_seconds (how long a value is served "
        "EXPIRED before it is reclaimed and reads MISSING), features"
    )
    streams: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Stream -> entity, event time field, typed fields, source (issue 13)"
    )
    on_demand: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="On-demand feature -> function, inputs, request fields and outputs (computed at request time)",
    )
    services: dict[str, ServiceDocument] = Field(
        default_factory=dict, description="Feature service -> its resolved features and defaults (GET /v1/services)"
    )


class FeatureUsage(BaseModel):
    requests: int = Field(description="Fetch requests that asked for it")
    values: int = Field(description="Values served")
    statuses: dict[str, int] = Field(description="Values served per status")
    default_rate: float | None = Field(description="Share of values served as the default (not PRESENT)")


class ServiceUsage(FeatureUsage):
    requests: int = Field(description="Fetch requests by this service")
    values: int = Field(description="Values served to it (stored and on-demand)")
    keys: dict[str, FeatureUsage] = Field(description="The same, per API key name (when keys are on)")


class Writes(BaseModel):
    rows: int = Field(description="Rows stored")
    skipped_stale: int = Field(description="Rows not stored: the stored row was as new or newer")
    rejected: int = Field(description="Rows a loader rejected (an HTTP write with a bad row is refused whole)")
    last_at: str | None = Field(description="When the last write or batch was stored, RFC 3339")


class GroupWrites(Writes):
    via: dict[str, Writes] = Field(
        description="Per writer: api, feast, materialize, watch (the drop folder), spark; a loader counts here "
        "when it runs with the gateway's GATEWAY_METRICS_DIR"
    )


class GroupUsage(BaseModel):
    backend: str
    features: dict[str, FeatureUsage]
    writes: GroupWrites = Field(description="What writes and loads put in the group since `since`")


class UsageReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "since": "2026-11-26T10:00:00Z",
                    "groups": {
                        "consumer_live": {
                            "backend": "hot",
                            "features": {
                                "orders_7d": {
                                    "requests": 120,
                                    "values": 360,
                                    "default_rate": 0.6667,
                                    "statuses": {"PRESENT": 120, "MISSING": 120, "EXPIRED": 120, "UNAVAILABLE": 0},
                                }
                            },
                            "writes": {
                                "rows": 1800,
                                "skipped_stale": 0,
                                "rejected": 2,
                                "last_at": "2026-11-26T10:05:00Z",
                                "via": {
                                    "watch": {
                                        "rows": 1800,
                                        "skipped_stale": 0,
                                        "rejected": 2,
                                        "last_at": "2026-11-26T10:05:00Z",
                                    }
                                },
                            },
                        }
                    },
                    "never_requested": ["consumer_live:avg_basket"],
                }
            ]
        }
    )

    since: str = Field(description="Counting started (the oldest worker's start), RFC 3339")
    groups: dict[str, GroupUsage]
    never_requested: list[str] = Field(description="Features no request has asked for since `since`")
    services: dict[str, ServiceUsage] = Field(
        description="Per feature service (a model), and `(features)` for fetches that list their features"
    )
    unused: list[str] = Field(description="Features no service serves or computes from and no request asked for")


class BackendStatus(BaseModel):
    type: str
    circuit: CircuitName = Field(description="The read circuit")
    write_circuit: CircuitName
    migrated: bool
    reads: dict[str, int] = Field(description="Reads by outcome: ok, error, timeout, open")
    series: list[list[float]] = Field(description="[window start (unix s), reads, mean ms, max ms] per 5 s")


class LoadStatus(BaseModel):
    workers: int = Field(description="Worker processes reporting")
    limit: int = Field(description="Admission limit, summed over workers (0: admission control is off)")
    inflight: int = Field(description="Requests being served now, summed over workers")
    shed: dict[str, int] = Field(description="Requests refused with 503 overload since start, by work: read, write")
    loop_lag_ms: float = Field(description="Worst recent event-loop lag of any worker")


class GroupStatus(BaseModel):
    values: int
    statuses: dict[str, int]
    default_rate: float | None


class ServiceStatus(GroupStatus):
    features: int | None = Field(description="Features it serves (null for `(features)`)")
    requests: int


class LatencySummary(BaseModel):
    count: int
    mean_ms: float | None
    p50_ms_at_most: float | None = Field(description="Upper bound of the latency bucket holding the median")
    p99_ms_at_most: float | None


class StreamConsumerStatus(BaseModel):
    name: str
    seconds_since_report: float = Field(description="A running consumer reports every second")
    stored: int = Field(description="Messages stored and acknowledged under this name, across its runs")
    dead: int = Field(description="Messages that were not events, set aside")


class StreamGroupStatus(BaseModel):
    name: str
    max_lag_seconds: float | None
    expired: bool = Field(description="Served EXPIRED (defaults) now: the stream is further behind than max_lag")


class StreamStatus(BaseModel):
    source: str | None = Field(description="redis_stream, nats, or null: events come over HTTP only")
    lag_events: int | None = Field(description="Messages at the source not yet stored (null: unknown)")
    lag_seconds: float | None = Field(
        description="Age of the oldest of them (0: caught up); grows while the source cannot be asked"
    )
    source_error: str | None
    consumers: list[StreamConsumerStatus]
    live_consumers: int | None = None
    event_to_servable: dict[str, LatencySummary] = Field(
        description="From the message's append to the source (`consumer`), or the request's arrival (`http`), "
        "until its aggregates are servable"
    )
    http_events: dict[str, int] = Field(description="Events sent over HTTP: accepted, duplicate, late")
    groups: list[StreamGroupStatus]


class StatusReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "now": 1795726812.5,
                    "started": 1795726809.7,
                    "registry": {"backends": {}, "entities": {}, "groups": {}},
                    "backends": {
                        "hot": {
                            "type": "redis",
                            "circuit": "closed",
                            "write_circuit": "closed",
                            "migrated": True,
                            "reads": {"ok": 30},
                            "series": [[1795726810, 30, 0.41, 1.2]],
                        }
                    },
                    "load": {
                        "workers": 1,
                        "limit": 24,
                        "inflight": 3,
                        "shed": {"read": 0, "write": 0},
                        "loop_lag_ms": 0.4,
                    },
                    "groups": {
                        "consumer_live": {
                            "values": 90,
                            "default_rate": 0.1,
                            "statuses": {"PRESENT": 81, "MISSING": 9, "EXPIRED": 0, "UNAVAILABLE": 0},
                        }
                    },
                }
            ]
        }
    )

    now: float
    started: float
    registry: RegistryDocument
    backends: dict[str, BackendStatus]
    load: LoadStatus
    groups: dict[str, GroupStatus]
    services: dict[str, ServiceStatus] = Field(
        default_factory=dict, description="Per feature service, and `(features)` for fetches by feature list"
    )
    streams: dict[str, StreamStatus] = Field(default_factory=dict, description="Per stream: freshness")


class CostHolding(BaseModel):
    role: Literal["record", "cache", "move_target", "move_source"] = Field(
        description="record: the group's own backend (its system of record); cache: its hot tier (copies kept a "
        "ttl); move_target: where a move is copying it; move_source: the old copy of a move that cut reads over"
    )
    keys: int | None = Field(description="Keys (Redis) or rows (SQL) holding its values; null: not measured")
    bytes: int | None = Field(description="As the backend measures them (values and keys; not replicas or indexes)")
    gib: float | None
    monthly_cost: float | None = Field(description="gib * the backend's cost_per_gb_month; null without a price")
    sampled: bool = Field(description="Bytes extrapolated from a sample of its keys (Redis, over 256 keys)")
    keys_estimated: bool = Field(description="Keys extrapolated too: the count was cut short at its time budget")


class GroupCost(BaseModel):
    backends: dict[str, CostHolding] = Field(description="Every backend holding its values")
    monthly_cost: float | None = Field(description="Over its backends with a price; null when none has one")
    requests: int = Field(description="Since the gateway started: those of its most requested feature")
    requests_per_day: float | None = Field(description="Extrapolated from `requests` over `uptime_seconds`")
    values: int = Field(description="Values served")
    statuses: dict[str, int] = Field(description="Values served per status")
    default_rate: float | None = Field(description="Share of values served as defaults (MISSING, EXPIRED, UNAVAILABLE)")
    never_requested: list[str] = Field(description="Its features no request asked for since the gateway started")


class BackendCost(BaseModel):
    type: str
    cost_per_gb_month: float | None = Field(description="The registry's price of a GiB held a month")
    keys: int | None = Field(description="Over the groups reported; null when it could not be measured")
    bytes: int | None
    gib: float | None
    monthly_cost: float | None
    measured_at: float | None = Field(description="Unix time of the measurement (kept up to 60 s)")
    error: str | None = Field(description="Why it was not measured (down, too slow, unsupported)")


class CostReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "since": "2026-11-26T10:00:00Z",
                    "uptime_seconds": 86400.0,
                    "backends": {
                        "hot": {
                            "type": "redis",
                            "cost_per_gb_month": 8.0,
                            "keys": 1000000,
                            "bytes": 1288490188,
                            "gib": 1.2,
                            "monthly_cost": 9.6,
                            "measured_at": 1795813200.0,
                            "error": None,
                        }
                    },
                    "groups": {
                        "consumer_history": {
                            "backends": {
                                "hot": {
                                    "role": "record",
                                    "keys": 1000000,
                                    "bytes": 1288490188,
                                    "gib": 1.2,
                                    "monthly_cost": 9.6,
                                    "sampled": True,
                                    "keys_estimated": False,
                                }
                            },
                            "monthly_cost": 9.6,
                            "requests": 259200,
                            "requests_per_day": 259200.0,
                            "values": 777600,
                            "statuses": {"PRESENT": 753000, "MISSING": 24600, "EXPIRED": 0, "UNAVAILABLE": 0},
                            "default_rate": 0.0316,
                            "never_requested": [],
                        }
                    },
                    "monthly_cost": 9.6,
                    "recommendations": [
                        "consumer_history: 1.2 GiB on hot (9.60/month), 3 req/s, p99 need unknown: candidate for "
                        "bulk + cache (there 0.30/month before the cache)"
                    ],
                    "notes": ["requests per day are extrapolated from the 86400 s since the gateway started"],
                }
            ]
        }
    )

    since: str = Field(description="Usage is counted from here (the gateway's start), RFC 3339")
    uptime_seconds: float
    backends: dict[str, BackendCost] = Field(description="Per backend: price, and the bytes of the groups reported")
    groups: dict[str, GroupCost]
    monthly_cost: float | None = Field(description="Summed over the backends with a price")
    recommendations: list[str] = Field(description="Plain facts to act on; the gateway acts on none of them")
    notes: list[str] = Field(description="How the figures were made")
