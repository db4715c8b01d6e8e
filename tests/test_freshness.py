"""Freshness of streams you can see (issue 13, part 5): the consumers' lag measured at the source (Redis Streams,
NATS JetStream), their reports, event-to-servable latency in /metrics and /v1/status, and `max_lag` turning a
group's aggregates EXPIRED while its stream is behind, so a stalled consumer's frozen count is never served as
a quiet entity's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from app.registry.load import RegistryError, parse_registry
from app.serving.gateway import Gateway
from app.streams.consume import Consumer, NatsConsumer, RedisStreamConsumer
from app.streams.sources import NatsSource
from tests.support.clients import fetch, metric_value, parse_metrics
from tests.support.gateways import GatewayFactory
from tests.support.registries import REDIS_URL, Names
from tests.support.waiting import eventually

NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")
FEATURES = ["orders_agg:n_1h", "orders_agg:spent_1h"]


def registry(names: Names, source: str, max_lag: str = "30s") -> str:
    return f"""
backends:
  hot: {names.backend("redis")}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
streams:
  orders:
    entity: consumer
    event_time: ts
    fields: {{value: float64}}
    source: {source}
groups:
  orders_agg:
    backend: hot
    stream: orders
    allowed_lateness: 1h
    max_lag: {max_lag}
    aggregations:
      n: {{function: count, windows: [1h], default: -1}}
      spent: {{function: sum, field: value, windows: [1h], default: -1.0}}
"""


def redis_source(names: Names) -> str:
    return f'{{type: redis_stream, url: "{REDIS_URL}", stream: "{names.prefix}orders", group: fg}}'


@contextlib.asynccontextmanager
async def consuming(consumer: Consumer, until: int) -> AsyncIterator[None]:
    """The consumer running in this process until it has stored `until` messages."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(lambda: _stored(consumer, until, task), within=30)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await consumer.aclose()


async def _stored(consumer: Consumer, until: int, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # a consumer that failed fails the test with its error
    return consumer.stored >= until


async def status_of(client: Any) -> dict[str, Any]:
    response = await client.get("/v1/status")
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()["streams"]["orders"]
    return report


async def test_a_stream_behind_max_lag_serves_expired_defaults_until_its_consumer_catches_up(
    gateway: GatewayFactory, names: Names
) -> None:
    key = f"{names.prefix}orders"
    client = redis.Redis.from_url(REDIS_URL)
    old_ms = int(time.time() * 1000) - 120_000
    try:
        # Five events appended two minutes ago (an entry id is its append time), and no consumer since
        for i in range(5):
            await client.xadd(key, {"consumer_id": 7, "ts": old_ms, "value": 2.0}, id=f"{old_ms + i}-0")
        text = registry(names, redis_source(names))
        async with gateway(text) as http:
            gw: Gateway = http.app.state.gateway
            await gw.freshness.probe()
            answer = await fetch(http, features=FEATURES, entities={"consumer_id": [7, 8]})
            for row in answer["rows"]:  # 8 has no events: its 0 would be as frozen as 7's
                assert row["statuses"] == ["EXPIRED", "EXPIRED"]
                assert row["values"] == [-1, -1.0]
            report = await status_of(http)
            assert report["lag_events"] == 5
            # The age of the oldest entry, two minutes at its append: no less, and no more than has passed since
            assert 119 < report["lag_seconds"] <= time.time() - old_ms / 1000 + 1
            assert report["groups"] == [{"name": "orders_agg", "max_lag_seconds": 30.0, "expired": True}]
            samples = parse_metrics((await http.get("/metrics")).text)
            assert metric_value(samples, "stream_lag_events", stream="orders") == 5
            assert metric_value(samples, "aggregation_group_expired", group="orders_agg") == 1

            consumer = RedisStreamConsumer(gw, gw.registry.streams["orders"], "c1", block_ms=100)
            async with consuming(consumer, 5):
                pass
            await gw.freshness.probe()
            answer = await fetch(http, features=FEATURES, entities={"consumer_id": [7, 8]})
            assert answer["rows"][0]["values"] == [5, 10.0]
            assert answer["rows"][0]["statuses"] == ["PRESENT", "PRESENT"]
            assert answer["rows"][1]["values"] == [0, 0.0]  # a quiet entity, now that the stream is caught up
            report = await status_of(http)
            assert (report["lag_events"], report["lag_seconds"]) == (0, 0.0)
            assert report["groups"][0]["expired"] is False
            [seen] = report["consumers"]
            assert (seen["name"], seen["stored"], seen["dead"]) == ("c1", 5, 0)
            # Event to servable is from the append: these waited two minutes, past the last bucket
            assert report["event_to_servable"]["consumer"]["count"] == 5
            assert report["event_to_servable"]["consumer"]["p99_ms_at_most"] is None

            # A consumer that took an entry and died: the entry is pending, and counts as lag
            appended = time.time()
            await client.xadd(key, {"consumer_id": 7, "ts": int(time.time() * 1000), "value": 1.0})
            await client.xreadgroup("fg", "ghost", {key: ">"}, count=10)
            await gw.freshness.probe()
            report = await status_of(http)
            assert report["lag_events"] == 1
            assert 0 <= report["lag_seconds"] <= time.time() - appended + 1  # its age, not the old entries'

            # A consumer under the same name goes on counting from its last report (Prometheus counters)
            again = RedisStreamConsumer(gw, gw.registry.streams["orders"], "c1", block_ms=100, claim_idle_ms=0)
            async with consuming(again, 1):
                pass
            await gw.freshness.probe()
            report = await status_of(http)
            assert report["lag_events"] == 0
            assert report["consumers"][0]["stored"] == 6
            latency = report["event_to_servable"]["consumer"]
            assert latency["count"] == 6
            samples = parse_metrics((await http.get("/metrics")).text)
            assert metric_value(samples, "stream_messages_total", stream="orders", outcome="stored") == 6
            count = "stream_event_to_servable_seconds_count"
            assert metric_value(samples, count, stream="orders", via="consumer") == 6
    finally:
        await client.aclose()


async def test_a_source_that_does_not_answer_lets_the_lag_grow(gateway: GatewayFactory, names: Names) -> None:
    """Nothing fresher can arrive while the source is down, so the lag grows from its last measure."""
    text = registry(names, '{type: redis_stream, url: "redis://127.0.0.1:1/0", stream: orders}')
    async with gateway(text) as http:
        gw: Gateway = http.app.state.gateway
        await gw.freshness.probe()
        state = gw.freshness.streams["orders"]
        assert state.error is not None
        assert not gw.freshness.behind("orders", 30)  # it has not been down for 30 s yet
        state.measured -= 31  # as if 31 s had passed
        assert gw.freshness.behind("orders", 30)
        answer = await fetch(http, features=FEATURES, entities={"consumer_id": [7]})
        assert answer["rows"][0]["statuses"] == ["EXPIRED", "EXPIRED"]
        report = await status_of(http)
        assert report["source_error"]
        assert report["lag_seconds"] >= 31
        samples = parse_metrics((await http.get("/metrics")).text)
        assert metric_value(samples, "stream_source_up", stream="orders") == 0


async def test_nats_lag_and_consumer_reports(gateway: GatewayFactory, names: Names) -> None:
    import json

    import nats

    subject, stream_name = f"fg.{names.schema}.orders", f"FG_{names.schema}"
    text = registry(names, f'{{type: nats, url: "{NATS_URL}", subject: "{subject}", durable: fg}}')
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    bucket = NatsSource(parse_registry(text, "t").streams["orders"], "test").bucket
    try:
        await js.add_stream(name=stream_name, subjects=[subject])
        first_sent = time.time()
        for i in range(4):
            event = {"consumer_id": 3, "ts": int(time.time() * 1000), "value": float(i)}
            await js.publish(subject, json.dumps(event).encode())
        async with gateway(text) as http:
            gw: Gateway = http.app.state.gateway
            await gw.freshness.probe()
            report = await status_of(http)
            assert report["source"] == "nats"
            assert report["lag_events"] == 4  # no consumer yet: the whole stream is behind
            assert report["lag_seconds"] <= time.time() - first_sent + 1  # the age of the first message
            assert report["groups"][0]["expired"] is False
            consumer = NatsConsumer(gw, gw.registry.streams["orders"], "n1", block_ms=100)
            async with consuming(consumer, 4):
                pass
            await gw.freshness.probe()
            report = await status_of(http)
            assert (report["lag_events"], report["lag_seconds"]) == (0, 0.0)
            [seen] = report["consumers"]
            assert (seen["name"], seen["stored"]) == ("n1", 4)
            assert report["event_to_servable"]["consumer"]["count"] == 4
            answer = await fetch(http, features=FEATURES, entities={"consumer_id": [3]})
            assert answer["rows"][0]["values"] == [4, 6.0]
    finally:
        for cleanup in (js.delete_stream(stream_name), js.delete_key_value(bucket)):
            with contextlib.suppress(Exception):
                await cleanup
        await nc.close()


async def test_events_over_http_report_their_latency_and_outcomes(gateway: GatewayFactory, names: Names) -> None:
    text = registry(names, redis_source(names))
    async with gateway(text) as http:
        event = {"event_id": "e1", "consumer_id": 5, "ts": int(time.time() * 1000), "value": 1.5}
        for _ in range(2):
            assert (await http.post("/v1/events/orders", json={"events": [event]})).status_code == 200
        report = await status_of(http)
        assert report["http_events"] == {"accepted": 1, "duplicate": 1, "late": 0}
        assert report["event_to_servable"]["http"]["count"] == 2
        samples = parse_metrics((await http.get("/metrics")).text)
        count = "stream_event_to_servable_seconds_count"
        assert metric_value(samples, count, stream="orders", via="http") == 2
        assert metric_value(samples, "stream_http_events_total", stream="orders", outcome="duplicate")


@pytest.mark.parametrize(
    ("source", "max_lag", "why"),
    [
        ("null", "30s", "has none"),
        ('{type: redis_stream, url: "redis://127.0.0.1:6379/0"}', "1s", "at least 2s"),
    ],
)
def test_max_lag_needs_a_source_to_measure(names: Names, source: str, max_lag: str, why: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_registry(registry(names, source, max_lag), "t", env={})
    assert caught.value.path == "groups.orders_agg.max_lag"
    assert why in str(caught.value)


async def test_an_unreadable_consumer_report_does_not_stop_the_lag_measure(
    gateway: GatewayFactory, names: Names
) -> None:
    key = f"{names.prefix}orders"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.hset(f"{key}:fg-consumers", "old-version", b'{"name": 1}')
        await client.xadd(key, {"consumer_id": 7, "ts": int(time.time() * 1000), "value": 2.0})
        async with gateway(registry(names, redis_source(names))) as http:
            gw: Gateway = http.app.state.gateway
            await gw.freshness.probe()
            state = gw.freshness.streams["orders"]
            assert state.error is None
            assert state.lag is not None
            assert state.lag.events == 1
            assert state.consumers == []
    finally:
        await client.aclose()
