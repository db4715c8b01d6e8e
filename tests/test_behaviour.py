"""The serving contract, on every backend type: values, dtypes, order, defaults, statuses, writes."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis.asyncio as redis

from tests.support.clients import fetch, live_row, stamp, write
from tests.support.gateways import GatewayFactory
from tests.support.registries import REDIS_URL, Names


async def test_values_come_back_typed_and_in_request_order(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(names.registry(names.backend(kind))) as client:
        assert await write(client, "live", [live_row(101, 3), live_row(102, 8)]) == {
            "group": "live",
            "written": 2,
            "skipped_stale": 0,
        }
        await write(client, "history", [{"consumer_id": 101, "lifetime_orders": 17, "lifetime_value": 402.5}])
        answer = await fetch(
            client,
            entities={"consumer_id": [102, 101]},
            features=[
                "history:lifetime_orders",
                "live:embedding",
                "live:orders_7d",
                "live:name",
                "live:active",
                "live:raw",
                "live:ids",
                "live:avg_basket",
            ],
        )
    assert answer["features"][0] == "history:lifetime_orders"
    first, second = answer["rows"]
    assert first["entity"] == {"consumer_id": 102}
    assert first["values"] == [
        -1,
        [0.25, -1.5, 8.0],
        8,
        "consumer 102 ✓",
        False,
        base64.b64encode(bytes([102, 0, 255])).decode(),
        [102, -102],
        12.0,
    ]
    assert first["statuses"] == ["MISSING"] + ["PRESENT"] * 7
    assert second["values"][:3] == [17, [0.25, -1.5, 3.0], 3]
    assert second["statuses"] == ["PRESENT"] * 8
    assert isinstance(second["values"][2], int)
    assert isinstance(second["values"][7], float)
    assert answer["degraded"] is False
    assert answer["backends"]["hot"]["status"] == "ok"


async def test_group_star_expands_in_registry_order(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(names.registry(names.backend(kind))) as client:
        await write(client, "history", [{"consumer_id": 7, "lifetime_orders": 1, "lifetime_value": None}])
        answer = await fetch(client, entities={"consumer_id": [7]}, features=["history:*"])
    assert answer["features"] == ["history:lifetime_orders", "history:lifetime_value"]
    # A value written as null is MISSING and gets its default (none declared: null).
    assert answer["rows"][0]["values"] == [1, None]
    assert answer["rows"][0]["statuses"] == ["PRESENT", "MISSING"]


async def test_unknown_entities_are_missing_with_defaults(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(names.registry(names.backend(kind))) as client:
        await write(client, "stores", [{"store_id": "s-1", "open_orders": 4}])
        answer = await fetch(client, entities={"consumer_id": [999]}, features=["live:*"])
        stores = await fetch(client, entities={"store_id": ["s-1", "nope", "s-1"]}, features=["stores:open_orders"])
    row = answer["rows"][0]
    assert row["values"] == [0, 0.5, False, "none", None, None, [0, 0]]
    assert row["statuses"] == ["MISSING"] * 7
    assert [r["values"] for r in stores["rows"]] == [[4], [0], [4]]
    assert [r["statuses"][0] for r in stores["rows"]] == ["PRESENT", "MISSING", "PRESENT"]


async def test_an_unreadable_stored_value_is_missing_for_that_entity_only(
    gateway: GatewayFactory, names: Names
) -> None:
    async with gateway(names.registry(names.backend("redis"))) as client:
        await write(client, "live", [live_row(1, 1), live_row(2, 2)])
        admin = redis.Redis.from_url(REDIS_URL)
        # Layout 1, fresh, but an embedding that is text: decoding it fails
        row = [1, 1.0, True, "n", b"r", "not packed floats", b"\x00" * 16]
        now_us = time.time_ns() // 1000
        await admin.set(
            f"{names.prefix}live:2", b"\x01" + (now_us + (1 << 63)).to_bytes(8, "big") + msgspec.msgpack.encode(row)
        )
        await admin.aclose()
        answer = await fetch(client, entities={"consumer_id": [1, 2]}, features=["live:orders_7d", "live:ids"])
    assert answer["backends"]["hot"]["status"] == "ok"
    assert answer["rows"][0]["statuses"] == ["PRESENT", "PRESENT"]
    assert answer["rows"][1]["statuses"] == ["MISSING", "MISSING"]


async def test_old_values_are_expired_and_served_as_default(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(names.registry(names.backend(kind))) as client:
        await write(client, "live", [live_row(1, 5, at=stamp(-timedelta(minutes=90))), live_row(2, 6)])
        answer = await fetch(
            client, entities={"consumer_id": [1, 2]}, features=["live:orders_7d", "live:ids"], include_timestamps=True
        )
    expired, fresh = answer["rows"]
    assert expired["values"] == [0, [0, 0]]
    assert expired["statuses"] == ["EXPIRED", "EXPIRED"]
    assert expired["event_timestamps"] == [None, None]
    assert fresh["values"] == [6, [2, -2]]
    assert fresh["statuses"] == ["PRESENT", "PRESENT"]
    assert datetime.fromisoformat(fresh["event_timestamps"][0]) > datetime.now(UTC) - timedelta(minutes=1)


async def test_stale_rows_are_skipped_and_counted(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(names.registry(names.backend(kind))) as client:
        await write(client, "live", [live_row(1, 10, at=stamp())])
        result = await write(
            client,
            "live",
            [
                live_row(1, 99, at=stamp(-timedelta(minutes=5))),  # older than stored: skipped
                live_row(2, 20, at=stamp(-timedelta(minutes=1))),
                live_row(2, 21, at=stamp()),  # the newest row of an entity in one batch wins
            ],
        )
        answer = await fetch(client, entities={"consumer_id": [1, 2]}, features=["live:orders_7d"])
    assert result == {"group": "live", "written": 1, "skipped_stale": 2}
    assert [r["values"] for r in answer["rows"]] == [[10], [21]]


async def test_one_bad_row_rejects_the_whole_batch(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(names.registry(names.backend(kind))) as client:
        response = await client.post(
            "/v1/features/write",
            json={
                "group": "live",
                "rows": [
                    live_row(1, 1),
                    live_row(2, 2),
                    live_row(3, 3, embedding=[1.0, 2.0]),
                ],
            },
        )
        answer = await fetch(client, entities={"consumer_id": [1, 2]}, features=["live:orders_7d"])
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "rows[2].embedding"
    assert [r["statuses"] for r in answer["rows"]] == [["MISSING"], ["MISSING"]]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"orders_7d": 1.5}, "rows[0].orders_7d"),
        ({"orders_7d": True}, "rows[0].orders_7d"),
        ({"orders_7d": 2**63}, "rows[0].orders_7d"),
        ({"avg_basket": "1"}, "rows[0].avg_basket"),
        ({"active": 1}, "rows[0].active"),
        ({"raw": "not base64!"}, "rows[0].raw"),
        ({"embedding": [1, 2, "x"]}, "rows[0].embedding"),
        ({"embedding": [1, 2, 1e300]}, "rows[0].embedding"),
        ({"ids": [1.0, 2]}, "rows[0].ids"),
        ({"consumer_id": "101"}, "rows[0].consumer_id"),
        ({"event_timestamp": "yesterday"}, "rows[0].event_timestamp"),
        ({"colour": "red"}, "rows[0].colour"),
    ],
)
async def test_write_names_the_bad_field(
    gateway: GatewayFactory, names: Names, change: dict[str, Any], field: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post("/v1/features/write", json={"group": "live", "rows": [live_row(1, 1, **change)]})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


async def test_a_row_without_a_feature_is_refused(gateway: GatewayFactory, names: Names) -> None:
    row = live_row(1, 1)
    del row["avg_basket"]
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post("/v1/features/write", json={"group": "live", "rows": [row]})
    assert response.status_code == 422
    assert response.json()["field"] == "rows[0].avg_basket"


async def test_one_request_across_redis_and_cockroach(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis"), names.backend("cockroach"))) as client:
        await write(client, "live", [live_row(5, 3)])
        await write(client, "history", [{"consumer_id": 5, "lifetime_orders": 40, "lifetime_value": 99.5}])
        response = await client.post(
            "/v1/features/fetch",
            json={
                "entities": {"consumer_id": [5, 6]},
                "features": ["live:orders_7d", "history:lifetime_value", "live:avg_basket", "history:lifetime_orders"],
            },
        )
    answer = response.json()
    assert [r["values"] for r in answer["rows"]] == [[3, 99.5, 4.5, 40], [0, None, 0.5, -1]]
    assert answer["rows"][1]["statuses"] == ["MISSING"] * 4
    assert set(answer["backends"]) == {"hot", "bulk"}
    assert all(b["status"] == "ok" for b in answer["backends"].values())
    timing = response.headers["server-timing"]
    assert timing.startswith("hot;dur=")
    assert ", bulk;dur=" in timing
    assert ", total;dur=" in timing


async def test_two_join_keys_in_one_request(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        await write(client, "stores", [{"store_id": "s-9", "open_orders": 2}])
        await write(client, "live", [live_row(9, 4)])
        answer = await fetch(
            client,
            entities={"consumer_id": [9, 10], "store_id": ["s-9", "s-9"]},
            features=["stores:open_orders", "live:orders_7d"],
        )
    assert [r["entity"] for r in answer["rows"]] == [
        {"consumer_id": 9, "store_id": "s-9"},
        {"consumer_id": 10, "store_id": "s-9"},
    ]
    assert [r["values"] for r in answer["rows"]] == [[2, 4], [2, 0]]
