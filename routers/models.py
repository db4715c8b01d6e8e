"""Pydantic models that document the API in the OpenAPI spec (and so in generated SDKs).

The hot path does not build these: bodies are decoded by `app/requests.py` and answers encoded once as
bytes; tests check that what is served validates against these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["PRESENT", "MISSING", "EXPIRED", "UNAVAILABLE"]


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
                }
            ]
        },
    )

    entities: dict[str, list[int | str]] = Field(
        description="Join key -> ids; one row per position. Every join key the features need, same length each."
    )
    features: list[str] = Field(description="`group:feature` or `group:*` (all of a group, in registry order)")
    deadline_ms: float | None = Field(None, gt=0, description="Answer within this; slower backends are UNAVAILABLE")
    include_timestamps: bool = Field(False, description="Add event_timestamps per row")
    strict: bool = Field(False, description="503 instead of a degraded answer when a backend fails")


class FetchRow(BaseModel):
    entity: dict[str, int | str]
    values: list[Any] = Field(description="values[i] answers features[i]; the declared default when not PRESENT")
    statuses: list[Status]
    event_timestamps: list[str | None] | None = Field(None, description="RFC 3339; null where not PRESENT")


class BackendReport(BaseModel):
    status: Literal["ok", "error", "timeout", "open"] = Field(
        description="open: the backend's circuit is open after repeated failures, so it was not asked"
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
    ready: bool
    backends: dict[str, str] = Field(description="Backend -> 'ok' or why it does not answer")
    circuits: dict[str, Literal["closed", "open", "half_open"]] = Field(
        description="Backend -> circuit state; open: fetches skip it until a probe succeeds"
    )
    detail: str | None = Field(None, description="The backends that do not answer")


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for code, text in {400: "Malformed body", 413: "Over a limit", 422: "Invalid field"}.items()
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a request body the route reads as raw bytes."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
            },
        }
    }
