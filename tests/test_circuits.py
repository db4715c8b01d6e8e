"""The gateway's circuit breakers on real servers: what opens a read circuit and what does not, what an open
circuit costs, and how a probe closes it. (The breaker's own state machine: test_breaker.py.)"""

from __future__ import annotations

import os
import signal
import time

import msgspec
import pytest
import redis.asyncio as redis

import app.serving.gateway
from tests.support.clients import fetch, live_row, write
from tests.support.faults import closed_backend
from tests.support.gateways import GatewayFactory
from tests.support.registries import REDIS_URL, Names
from tests.support.servers import RedisProcess


async def test_usage_stays_exact_when_plans_leave_the_cache(
    gateway: GatewayFactory, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.serving.gateway, "_PLAN_CACHE_SIZE", 2)  # every new feature list evicts an older plan
    orders = [
        ["live:orders_7d", "live:avg_basket"],
        ["live:avg_basket", "live:orders_7d"],
        ["live:orders_7d"],
        ["live:avg_basket", "live:orders_7d", "live:orders_7d"],
    ]
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        await write(client, "live", [live_row(1, 1)])
        for features in orders * 3:
            # A generous deadline: this is about counting, and a slow first SQLite read would be UNAVAILABLE
            await fetch(client, entities={"consumer_id": [1, 2]}, features=features, deadline_ms=5000)
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        usage = (await client.get("/v1/usage")).json()["groups"]["live"]["features"]
        cached = len(gw._plans)
    assert cached <= 2
    # orders_7d is asked 1 + 1 + 1 + 2 times per round (twice in the last list), 3 rounds, 2 rows each
    assert usage["orders_7d"]["values"] == 5 * 3 * 2
    assert usage["orders_7d"]["statuses"]["PRESENT"] == 5 * 3
    assert usage["avg_basket"]["values"] == 3 * 3 * 2


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


async def test_writes_the_server_refuses_do_not_open_the_read_circuit(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis")), breaker_failures=2) as client:
        await write(client, "live", [live_row(1, 1)])
        admin = redis.Redis.from_url(REDIS_URL)
        await admin.hset(f"{names.prefix}live:9", "not", "a blob")  # the write script's GET: WRONGTYPE
        await admin.aclose()
        refused = [
            (await client.post("/v1/features/write", json={"group": "live", "rows": [live_row(9, 1)]})).status_code
            for _ in range(4)
        ]
        answer = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
    assert refused == [503] * 4
    assert answer["backends"]["hot"]["status"] == "ok"
    assert answer["rows"][0]["statuses"] == ["PRESENT"]


async def test_strict_failures_are_counted(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"), closed_backend("redis", names))) as client:
        strict = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1]}, "features": ["history:lifetime_orders"], "strict": True},
        )
        metrics = (await client.get("/metrics")).text
    assert strict.status_code == 503
    assert 'feature_gateway_backend_reads_total{backend="bulk",outcome="error"} 1' in metrics


async def test_a_frozen_backend_is_skipped_after_repeated_slow_misses(gateway: GatewayFactory, names: Names) -> None:
    server = RedisProcess()
    server.start()
    assert server.proc is not None
    request = {
        "entities": {"consumer_id": [1]},
        "features": ["live:orders_7d", "history:lifetime_orders"],
        "deadline_ms": 100,
    }
    try:
        registry = names.registry(names.backend("redis", url=server.url), names.backend("sqlite"))
        async with gateway(registry, breaker_failures=3, breaker_reset_ms=60_000) as client:
            await fetch(client, **request)
            os.kill(server.proc.pid, signal.SIGSTOP)  # no error ever comes back: only the deadline
            answers = [await fetch(client, **request) for _ in range(5)]
            tight = await fetch(client, **{**request, "deadline_ms": 5})
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert [a["backends"]["hot"]["status"] for a in answers] == ["timeout"] * 3 + ["open"] * 2
    assert answers[4]["backends"]["hot"]["ms"] == 0
    assert answers[4]["rows"][0]["statuses"] == ["UNAVAILABLE", "MISSING"]
    assert tight["backends"]["hot"]["status"] == "open"
