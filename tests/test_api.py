"""HTTP surface: bad bodies get 4xx problem+json (never a 500), limits, registry, health, OpenAPI."""

from __future__ import annotations

from typing import Any

import pytest

from routers.models import FetchResponse, WriteResponse
from tests.support.clients import JSON, live_row, write
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

GOOD = {"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"not json", 400, "(body)"),
        (b"", 400, "(body)"),
        (b"[1, 2]", 422, "(body)"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["nope:x"]}', 422, "features[0]"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["live:nope"]}', 422, "features[0]"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["live"]}', 422, "features[0]"),
        (b'{"entities": {"consumer_id": [1]}, "features": []}', 422, "features"),
        (b'{"entities": {"consumer_id": []}, "features": ["live:orders_7d"]}', 422, "entities.consumer_id"),
        (b'{"entities": {}, "features": ["live:orders_7d"]}', 422, "entities"),
        (b'{"entities": {"driver_id": [1]}, "features": ["live:orders_7d"]}', 422, "entities.driver_id"),
        (b'{"entities": {"store_id": ["s"]}, "features": ["live:orders_7d"]}', 422, "entities.store_id"),
        (b'{"entities": {"consumer_id": ["1"]}, "features": ["live:orders_7d"]}', 422, "entities.consumer_id[0]"),
        (b'{"entities": {"consumer_id": [1.5]}, "features": ["live:orders_7d"]}', 422, "entities.consumer_id[0]"),
        (b'{"entities": {"consumer_id": [true]}, "features": ["live:orders_7d"]}', 422, "entities.consumer_id[0]"),
        (
            b'{"entities": {"consumer_id": [99999999999999999999]}, "features": ["live:orders_7d"]}',
            422,
            "entities.consumer_id[0]",
        ),
        (b'{"entities": {"store_id": [""]}, "features": ["stores:open_orders"]}', 422, "entities.store_id[0]"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"], "extra": 1}', 422, "extra"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"], "deadline_ms": -5}', 422, "deadline_ms"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"], "deadline_ms": 1e9}', 422, "deadline_ms"),
        (
            b'{"entities": {"consumer_id": [[[[[[[[[[1]]]]]]]]]]}, "features": ["live:orders_7d"]}',
            422,
            "entities.consumer_id[0]",
        ),
        (
            b'{"entities": {"consumer_id": [1, 2], "store_id": ["s"]}, '
            b'"features": ["live:orders_7d", "stores:open_orders"]}',
            422,
            "entities.store_id",
        ),
        (b'{"entities": {"consumer_id": [1, 2, 3, 4]}, "features": ["live:orders_7d"]}', 413, "entities.consumer_id"),
        (b'{"entities": {"consumer_id": [1]}, "features": ["live:*", "live:*"]}', 413, "features"),
    ],
)
async def test_bad_fetch_bodies_get_problem_json(
    gateway: GatewayFactory, names: Names, body: bytes, status: int, field: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite")), max_entities=3, max_features=10) as client:
        response = await client.post("/v1/features/fetch", headers=JSON, content=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["field"] == field
    assert problem["title"]
    assert problem["detail"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"group": "nope", "rows": [{"consumer_id": 1}]}, 422, "group"),
        ({"group": "live", "rows": []}, 422, "rows"),
        ({"group": "live"}, 422, "rows"),
        ({"group": "live", "rows": [{"orders_7d": 1}]}, 422, "rows[0].consumer_id"),
        ({"group": "live", "rows": [1]}, 422, "rows[0]"),
        ({"group": "live", "rows": [{"consumer_id": 1}] * 6}, 413, "rows"),
    ],
)
async def test_bad_write_bodies_get_problem_json(
    gateway: GatewayFactory, names: Names, body: dict[str, Any], status: int, field: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite")), max_write_rows=5) as client:
        response = await client.post("/v1/features/write", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field


async def test_body_over_the_limit_is_refused(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite")), max_body_bytes=200) as client:
        big = {"entities": {"consumer_id": list(range(100))}, "features": ["live:orders_7d"]}
        response = await client.post("/v1/features/fetch", json=big)

        async def chunks():  # type: ignore[no-untyped-def]  # no content-length: refused while streaming
            for _ in range(10):
                yield b" " * 100

        streamed = await client.post("/v1/features/fetch", headers=JSON, content=chunks())
        fine = await client.post("/v1/features/fetch", json=GOOD)
    assert response.status_code == 413
    assert streamed.status_code == 413
    assert fine.status_code == 200


async def test_unknown_route_and_method_are_problem_json(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        missing = await client.get("/v2/nothing")
        wrong_method = await client.get("/v1/features/fetch")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == "application/problem+json"


async def test_answers_match_the_documented_models(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        written = await write(client, "live", [live_row(1, 2)])
        response = await client.post("/v1/features/fetch", json={**GOOD, "include_timestamps": True})
    WriteResponse.model_validate(written)
    FetchResponse.model_validate(response.json())


async def test_registry_health_and_readiness(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"), names.backend("cockroach"))) as client:
        registry = (await client.get("/v1/registry")).json()
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert registry["groups"]["live"]["ttl_seconds"] == 3600
    assert registry["groups"]["live"]["features"]["ids"] == {"dtype": "int64[2]", "default": [0, 0]}
    assert registry["groups"]["history"]["backend"] == "bulk"
    assert registry["backends"]["bulk"]["type"] == "cockroach"
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "backends": {"hot": "ok", "bulk": "ok"},
        "circuits": {"hot": "closed", "bulk": "closed"},
        "write_circuits": {"hot": "closed", "bulk": "closed"},
    }


async def test_registry_hides_passwords(gateway: GatewayFactory, names: Names) -> None:
    bulk = names.backend("cockroach", dsn="postgresql://root:s3cret@127.0.0.1:5432/test")
    async with gateway(names.registry(names.backend("sqlite"), bulk)) as client:
        text = (await client.get("/v1/registry")).text
    assert "s3cret" not in text
    assert "root:***@127.0.0.1" in text


async def test_openapi_has_readable_operations(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        spec = (await client.get("/openapi.json")).json()
    operations = {op["operationId"]: op for path in spec["paths"].values() for op in path.values()}
    assert {"fetch_features", "write_features", "get_registry", "health", "ready"} <= operations.keys()
    fetch_op = operations["fetch_features"]
    assert fetch_op["tags"] == ["features"]
    ref = fetch_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/FetchRequest"
    body_schema = spec["components"]["schemas"]["FetchRequest"]
    assert body_schema["examples"]
    assert set(body_schema["properties"]) == {
        "entities",
        "features",
        "service",
        "context",
        "deadline_ms",
        "include_timestamps",
        "strict",
    }
    assert "422" in fetch_op["responses"]


async def test_registry_hides_passwords_in_the_query_string(gateway: GatewayFactory, names: Names) -> None:
    bulk = names.backend("cockroach", dsn="postgresql://root@127.0.0.1:5432/test?password=s3cret&sslmode=prefer")
    async with gateway(names.registry(names.backend("sqlite"), bulk)) as client:
        text = (await client.get("/v1/registry")).text
    assert "s3cret" not in text
    assert "password=***" in text
    assert "sslmode=prefer" in text
