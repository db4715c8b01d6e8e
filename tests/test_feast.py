"""The Feast-compatible endpoints, driven with the exact bytes Feast's remote online store sends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.clients import live_row, stamp, write
from tests.support.faults import closed_backend
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names


def feast_event_ts(response_json: dict) -> datetime:  # type: ignore[type-arg]
    """What Feast's RemoteOnlineStore._get_event_ts does with our answer."""
    return datetime.fromisoformat(response_json["results"][1]["event_timestamps"][0].replace("Z", "+00:00"))


async def test_feast_client_request_gets_feast_shaped_answer(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"), closed_backend("redis", names))) as client:
        await write(client, "live", [live_row(1001, 7), live_row(1002, 8, at=stamp(-timedelta(minutes=90)))])
        # Feast: json.dumps({...}) posted as `data=`, so no content-type header and ", "/": " separators.
        body = json.dumps(
            {
                "features": ["live:orders_7d", "live:avg_basket", "history:lifetime_orders"],
                "entities": {"consumer_id": [1001, 1002, 1003]},
            }
        )
        response = await client.post("/get-online-features", content=body.encode())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["metadata"]["feature_names"] == ["consumer_id", "orders_7d", "avg_basket", "lifetime_orders"]
    ids, orders, basket, lifetime = answer["results"]
    assert ids == {
        "values": [1001, 1002, 1003],
        "statuses": ["PRESENT"] * 3,
        "event_timestamps": ["1970-01-01T00:00:00Z"] * 3,
    }
    assert orders["values"] == [7, 0, 0]  # the declared default where not PRESENT (Feast would give null)
    assert orders["statuses"] == ["PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND"]
    assert basket["values"] == [10.5, 0.5, 0.5]
    assert lifetime["statuses"] == ["INVALID"] * 3  # its backend is down
    assert lifetime["values"] == [-1, -1, -1]
    assert orders["event_timestamps"][1:] == ["1970-01-01T00:00:00Z"] * 2
    assert feast_event_ts(answer) > datetime.now().astimezone() - timedelta(minutes=1)
    assert response.headers["x-feature-gateway-degraded"] == "true"


async def test_full_feature_names(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        body = json.dumps(
            {"features": ["live:orders_7d"], "entities": {"consumer_id": [1]}, "full_feature_names": True}
        )
        answer = (await client.post("/get-online-features", content=body.encode())).json()
    assert answer["metadata"]["feature_names"] == ["consumer_id", "live__orders_7d"]


async def test_feast_errors_are_problem_json(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        unknown = await client.post(
            "/get-online-features",
            content=json.dumps(
                {"features": ["driver_hourly_stats:conv_rate"], "entities": {"driver_id": [1001]}}
            ).encode(),
        )
        service = await client.post(  # no services in this registry (tests/test_services.py has some)
            "/get-online-features",
            content=json.dumps({"feature_service": "driver_activity", "entities": {"consumer_id": [1]}}).encode(),
        )
    assert unknown.status_code == 422
    assert unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["field"] == "features[0]"
    assert service.status_code == 422
    assert service.json()["field"] == "feature_service"


async def test_feast_write_to_online_store(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        # RemoteOnlineStore.online_write_batch: columnar df, naive UTC isoformat times, a `created` column.
        now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)  # Feast sends naive UTC
        body = {
            "feature_view_name": "stores",
            "df": {
                "store_id": ["s-1", "s-2"],
                "open_orders": [4, 9],
                "event_timestamp": [now.isoformat(), now.isoformat()],
                "created": [None, None],
            },
            "allow_registry_cache": False,
        }
        written = await client.post("/write-to-online-store", json=body)
        answer = (
            await client.post(
                "/get-online-features",
                content=json.dumps(
                    {"features": ["stores:open_orders"], "entities": {"store_id": ["s-1", "s-2"]}}
                ).encode(),
            )
        ).json()
        writes = (await client.get("/v1/usage")).json()["groups"]["stores"]["writes"]
    assert written.status_code == 200, written.text
    assert written.json() == {"group": "stores", "written": 2, "skipped_stale": 0}
    assert (writes["rows"], list(writes["via"])) == (2, ["feast"])
    assert answer["results"][1]["values"] == [4, 9]
    assert answer["results"][1]["event_timestamps"][0] == now.isoformat() + "Z"


async def test_features_of_one_name_from_two_groups_collide_as_in_feast(gateway: GatewayFactory, names: Names) -> None:
    """Feast refuses `["live:orders_7d", "history:orders_7d"]` without full names: the answer would have two
    columns called `orders_7d`. With full names they are told apart; a ref asked twice still collides."""
    registry = names.registry(names.backend("sqlite")).replace("lifetime_value:", "orders_7d:")
    both = ["live:orders_7d", "history:orders_7d"]
    async with gateway(registry) as client:

        async def ask(features: list[str], full: bool) -> Any:
            body = {"features": features, "entities": {"consumer_id": [1]}, "full_feature_names": full}
            return await client.post("/get-online-features", content=json.dumps(body).encode())

        short = await ask(both, False)
        full = await ask(both, True)
        twice = await ask(["live:orders_7d", "live:orders_7d"], True)
        native = await client.post("/v1/features/fetch", json={"entities": {"consumer_id": [1]}, "features": both})
    assert short.status_code == 422
    assert short.json()["field"] == "features"
    assert short.json()["detail"].startswith("Duplicate features named orders_7d found.")
    assert "full_feature_names=True" in short.json()["detail"]
    assert full.status_code == 200
    assert full.json()["metadata"]["feature_names"] == ["consumer_id", "live__orders_7d", "history__orders_7d"]
    assert twice.status_code == 422
    assert "live__orders_7d" in twice.json()["detail"]
    assert native.status_code == 200  # our own endpoint answers by position and takes refs as asked
