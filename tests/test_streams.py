"""Real-time features over HTTP on each backend: events in (idempotent by id, late ones dropped, a bad one refusing
its batch), sliding-window aggregates out, in the same fetch as stored features."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.auth import key_entry, new_token
from app.errors import RegistryError
from app.registry.load import parse_registry
from tests.support.clients import fetch, live_row, write
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

STREAMING = """
streams:
  orders:
    entity: consumer
    event_time: ts
    fields: {value: float64, cuisine: string, items: int64}
"""
AGGREGATIONS = """
  orders_agg:
    backend: hot
    stream: orders
    allowed_lateness: 1h
    aggregations:
      n: {function: count, windows: [10m, 1h], default: 0}
      spent: {function: sum, field: value, windows: [1h]}
      items: {function: sum, field: items, windows: [1h]}
      avg: {function: mean, field: value, windows: [1h], default: -1.0}
      top: {function: max, field: value, windows: [1h]}
      low: {function: min, field: value, windows: [10m]}
      last: {function: last, field: cuisine, windows: [1h], default: none}
      kinds: {function: count_distinct, field: cuisine, windows: [1h]}
"""


def registry(names: Names, kind: str) -> str:
    base = names.registry(names.backend(kind))
    head, _, groups = base.partition("groups:\n")
    return head + STREAMING.strip("\n") + "\ngroups:\n" + AGGREGATIONS.strip("\n") + "\n" + groups


def at(minutes: float) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def order(
    event_id: str, consumer: int, minutes_ago: float, value: float | None, cuisine: str, **extra: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "consumer_id": consumer,
        "ts": at(minutes_ago),
        "value": value,
        "cuisine": cuisine,
    } | extra


FEATURES = [
    "orders_agg:n_10m",
    "orders_agg:n_1h",
    "orders_agg:spent_1h",
    "orders_agg:items_1h",
    "orders_agg:avg_1h",
    "orders_agg:top_1h",
    "orders_agg:low_10m",
    "orders_agg:last_1h",
    "orders_agg:kinds_1h",
    "live:orders_7d",
]


@pytest.mark.parametrize("kind", ["sqlite", "redis", "cockroach"])
async def test_events_in_windows_out(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(registry(names, kind)) as client:
        await write(client, "live", [live_row(1, 4)])
        batch = [
            order("a", 1, 2, 10.0, "thai", items=2),  # inside 10m and 1h
            order("b", 1, 30, 30.0, "sushi", items=1),  # 1h only, out of order: sent after a newer one
            order("c", 1, 45, None, "thai"),  # no value: counted, not summed
            order("d", 1, 90, 99.0, "pizza"),  # 90 minutes behind, past the hour of lateness: dropped
            order("a", 1, 2, 10.0, "thai", items=2),  # `a` again in the same batch
            order("e", 2, 1, 5.5, "pho"),
        ]
        first = await client.post("/v1/events/orders", json={"events": batch})
        # A consumer redelivering, concurrently with a new event
        again, late = await asyncio.gather(
            client.post("/v1/events/orders", json={"events": batch[:3]}),
            client.post("/v1/events/orders", json={"events": [order("f", 1, 8, 2.5, "ramen")]}),
        )
        answer = await fetch(client, features=FEATURES, entities={"consumer_id": [1, 2, 3]})
    assert first.status_code == 200, first.text
    assert first.json() == {
        "stream": "orders",
        "accepted": 4,
        "duplicates": 1,
        "late": 1,
        "groups": {"orders_agg": {"accepted": 4, "duplicates": 1, "late": 1}},
    }
    assert again.json()["duplicates"] == 3
    assert again.json()["accepted"] == 0
    assert late.json()["accepted"] == 1
    one, two, three = answer["rows"]
    # consumer 1: a (2 min, 10.0, thai), f (8 min, 2.5, ramen), b (30 min, 30.0, sushi), c (45 min, no value)
    assert one["values"] == [2, 4, 42.5, 3, pytest.approx(42.5 / 3), 30.0, 2.5, "thai", 3, 4]
    assert one["statuses"] == ["PRESENT"] * 10
    assert two["values"][:3] == [1, 1, 5.5]
    # No events: counts and sums are 0 (a fact), the rest their default (or null), MISSING
    assert three["values"] == [0, 0, 0.0, 0, -1.0, None, None, "none", 0, 0]
    assert three["statuses"] == ["PRESENT"] * 4 + ["MISSING"] * 4 + ["PRESENT", "MISSING"]


async def test_one_bad_event_refuses_its_batch_and_nothing_is_counted(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(registry(names, "sqlite")) as client:
        bad = [order("a", 1, 1, 10.0, "thai"), order("b", 1, 1, "ten", "thai")]  # type: ignore[arg-type]
        refused = await client.post("/v1/events/orders", json={"events": bad})
        problems = [
            await client.post("/v1/events/orders", json={"events": [event]})
            for event in (
                {"consumer_id": 1, "ts": at(1)},  # no id
                {"event_id": "x", "ts": at(1)},  # no entity
                {"event_id": "x", "consumer_id": 1},  # no time
                {"event_id": "x", "consumer_id": 1, "ts": "yesterday"},
                {"event_id": "x", "consumer_id": 1, "ts": at(-60)},  # an hour ahead of the clock
                {"event_id": "x", "consumer_id": 1, "ts": at(1), "tip": 1.0},
            )
        ]
        unknown = await client.post("/v1/events/nope", json={"events": [order("a", 1, 1, 1.0, "x")]})
        written = await client.post("/v1/features/write", json={"group": "orders_agg", "rows": [{"consumer_id": 1}]})
        millis = await client.post(  # epoch milliseconds are an event time too
            "/v1/events/orders",
            json={"events": [{"event_id": "m", "consumer_id": 1, "ts": int(datetime.now(UTC).timestamp() * 1000)}]},
        )
        answer = await fetch(client, features=["orders_agg:n_1h"], entities={"consumer_id": [1]})
    assert refused.status_code == 422
    assert refused.json()["field"] == "events[1].value"
    assert [p.json()["field"] for p in problems] == [
        "events[0].event_id",
        "events[0].consumer_id",
        "events[0].ts",
        "events[0].ts",
        "events[0].ts",
        "events[0].tip",
    ]
    assert {p.status_code for p in problems} == {422}
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "stream"
    assert written.status_code == 422
    assert "POST /v1/events/orders" in written.json()["detail"]
    assert millis.json()["accepted"] == 1
    assert answer["rows"][0]["values"] == [1]  # only `m`: the refused batch left nothing behind


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (("stream: orders", "stream: nope"), "groups.orders_agg.stream"),
        (
            ("n: {function: count, windows: [10m, 1h], default: 0}", "n: {function: median, windows: [1h]}"),
            "groups.orders_agg.aggregations.n.function",
        ),
        (
            ("spent: {function: sum, field: value", "spent: {function: sum, field: cuisine"),
            "groups.orders_agg.aggregations.spent.field",
        ),
        (
            ("spent: {function: sum, field: value", "spent: {function: sum, field: nope"),
            "groups.orders_agg.aggregations.spent.field",
        ),
        (
            ("windows: [10m, 1h], default: 0", "windows: [61s], default: 0"),
            "groups.orders_agg.aggregations.n.windows[0]",
        ),
        (
            ("windows: [10m, 1h], default: 0", "windows: [10m], default: zero"),
            "groups.orders_agg.aggregations.n.default",
        ),
        (
            ("n: {function: count, windows", "n: {function: count, field: value, windows"),
            "groups.orders_agg.aggregations.n.field",
        ),
        (("allowed_lateness: 1h", "allowed_lateness: soon"), "groups.orders_agg.allowed_lateness"),
        (("fields: {value: float64", "fields: {value: bytes"), "streams.orders.fields.value"),
        (("event_time: ts", "event_time: 3"), "streams.orders.event_time"),
        (("event_time: ts", "event_time: consumer_id"), "streams.orders.event_time"),
        (
            ("windows: [10m, 1h], default: 0", "windows: [1.5h], default: 0"),
            "groups.orders_agg.aggregations.n.windows[0]",
        ),
    ],
)
def test_registry_mistakes_name_their_path(names: Names, change: tuple[str, str], path: str) -> None:
    text = registry(names, "sqlite")
    assert change[0] in text
    with pytest.raises(RegistryError) as raised:
        parse_registry(text.replace(change[0], change[1]), "test-registry", env={})
    assert raised.value.field == path


def test_an_aggregation_group_is_not_held_on_a_redis_cluster_yet(names: Names) -> None:
    names.cluster_url = "redis://127.0.0.1:7000"
    text = registry(names, "redis_cluster")
    with pytest.raises(RegistryError) as raised:
        parse_registry(text, "test-registry", env={})
    assert raised.value.field == "groups.orders_agg.backend"


async def test_a_key_limited_to_other_groups_may_not_send_events(gateway: GatewayFactory, names: Names) -> None:
    token = new_token()
    keys = json.dumps([key_entry("live_writer", token, ["write", "read"], ["live"])])
    async with gateway(registry(names, "sqlite"), api_keys=keys) as client:
        refused = await client.post(
            "/v1/events/orders",
            json={"events": [order("a", 1, 1, 1.0, "x")]},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert refused.status_code == 403


async def test_what_no_store_can_hold_is_refused_or_kept_storable(gateway: GatewayFactory, names: Names) -> None:
    """An event id with NUL or a lone surrogate is a 422 (it could never be stored, and a consumer would retry it
    forever); int64 sums past 64 bits go on as floats rather than make the tile unwritable."""
    async with gateway(registry(names, "cockroach")) as client:
        nul = await client.post("/v1/events/orders", json={"events": [order("a\x00b", 1, 1, 1.0, "x")]})
        surrogate = await client.post(
            "/v1/events/orders",
            content=b'{"events": [{"event_id": "\\ud800", "consumer_id": 1, "ts": "' + at(1).encode() + b'"}]}',
            headers={"content-type": "application/json"},
        )
        huge = [order(f"h{i}", 1, 1, 1.0, "x", items=2**63 - 1) for i in range(3)]
        stored = await client.post("/v1/events/orders", json={"events": huge})
        answer = await fetch(client, features=["orders_agg:items_1h", "orders_agg:n_1h"], entities={"consumer_id": [1]})
    assert nul.status_code == 422
    assert nul.json()["field"] == "events[0].event_id"
    assert surrogate.status_code in (400, 422)
    assert stored.status_code == 200, stored.text
    assert answer["rows"][0]["values"] == [3 * float(2**63 - 1), 3]


async def test_a_limited_key_cannot_tell_streams_apart(gateway: GatewayFactory, names: Names) -> None:
    token = new_token()
    keys = json.dumps([key_entry("live_writer", token, ["write"], ["live"])])
    async with gateway(registry(names, "sqlite"), api_keys=keys) as client:
        answers = [
            await client.post(f"/v1/events/{name}", json={"events": []}, headers={"Authorization": f"Bearer {token}"})
            for name in ("orders", "no_such_stream")
        ]
    assert [a.status_code for a in answers] == [403, 403]
    assert [a.json()["detail"] for a in answers] == [
        "this API key may not send events of stream 'orders'",
        "this API key may not send events of stream 'no_such_stream'",
    ]
