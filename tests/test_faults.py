"""Backends that are down, slow, or come back: the answer degrades, the service does not."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from tests.support.clients import fetch, live_row, write
from tests.support.faults import closed_backend, keep_redis_busy, postgres_locked, redis_paused
from tests.support.gateways import GatewayFactory
from tests.support.registries import REDIS_URL, Names
from tests.support.servers import RedisProcess, TcpProxy, running
from tests.support.waiting import eventually

FEATURES = ["live:orders_7d", "history:lifetime_orders"]


async def seed(client: object, consumer: int = 1) -> None:
    await write(client, "live", [live_row(consumer, 3)])  # type: ignore[arg-type]
    await write(client, "history", [{"consumer_id": consumer, "lifetime_orders": 9, "lifetime_value": 1.0}])  # type: ignore[arg-type]


@pytest.mark.parametrize("down", ["redis", "cockroach", "sqlite"])
async def test_unreachable_backend_is_unavailable_and_the_other_present(
    gateway: GatewayFactory, names: Names, down: str
) -> None:
    healthy = "sqlite" if down != "sqlite" else "redis"
    async with gateway(names.registry(names.backend(healthy, file="healthy"), closed_backend(down, names))) as client:
        await write(client, "live", [live_row(1, 3)])
        started = time.perf_counter()
        answer = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES)
        elapsed = time.perf_counter() - started
        strict = await client.post(
            "/v1/features/fetch", json={"entities": {"consumer_id": [1]}, "features": FEATURES, "strict": True}
        )
        ready = await client.get("/readyz")
        write_down = await client.post(
            "/v1/features/write",
            json={"group": "history", "rows": [{"consumer_id": 1, "lifetime_orders": 1, "lifetime_value": 1.0}]},
        )
    row = answer["rows"][0]
    assert row["values"] == [3, -1]
    assert row["statuses"] == ["PRESENT", "UNAVAILABLE"]
    assert answer["degraded"] is True
    assert answer["backends"]["bulk"]["status"] == "error"
    assert answer["backends"]["hot"]["status"] == "ok"
    assert elapsed < 1.0
    assert strict.status_code == 503
    assert strict.headers["content-type"] == "application/problem+json"
    assert "bulk" in strict.json()["detail"]
    assert ready.status_code == 503
    assert ready.json()["backends"]["hot"] == "ok"
    assert ready.json()["backends"]["bulk"] != "ok"
    assert "bulk" in ready.json()["detail"]
    assert write_down.status_code == 503
    assert write_down.headers["content-type"] == "application/problem+json"


async def test_backend_missing_the_deadline_is_unavailable(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis"), names.backend("cockroach"))) as client:
        await seed(client)
        started = time.perf_counter()
        async with redis_paused(400):
            slow_redis = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=80)
        redis_elapsed = time.perf_counter() - started
        async with postgres_locked(names, 0.4):
            started = time.perf_counter()
            slow_pg = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=80)
            pg_elapsed = time.perf_counter() - started
            strict = await client.post(
                "/v1/features/fetch",
                json={"entities": {"consumer_id": [1]}, "features": FEATURES, "deadline_ms": 80, "strict": True},
            )
        after = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES)
    assert slow_redis["rows"][0]["statuses"] == ["UNAVAILABLE", "PRESENT"]
    assert slow_redis["rows"][0]["values"] == [0, 9]
    assert slow_redis["backends"]["hot"]["status"] == "timeout"
    assert slow_pg["rows"][0]["statuses"] == ["PRESENT", "UNAVAILABLE"]
    assert slow_pg["rows"][0]["values"] == [3, -1]
    assert slow_pg["backends"]["bulk"]["status"] == "timeout"
    assert slow_pg["degraded"] is True
    assert pg_elapsed < 0.3, "the answer waited for the slow backend instead of its deadline"
    assert redis_elapsed >= 0.4  # the pause was real (the context waits it out)
    assert strict.status_code == 503
    # Cancelled reads left no connection holding a stale reply: the next answer is whole and right.
    assert after["rows"][0]["statuses"] == ["PRESENT", "PRESENT"]
    assert after["rows"][0]["values"] == [3, 9]


async def test_backends_are_read_concurrently(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis"), names.backend("cockroach"))) as client:
        await seed(client)
        admin = redis.Redis.from_url(REDIS_URL)
        await admin.ping()  # connected beforehand, so the script below reaches Redis before the fetch
        async with postgres_locked(names, 0.1):
            # A script spinning for 100 ms holds Redis for exactly that long (a CLIENT PAUSE ends only at the
            # server's next cron tick, up to 100 ms late, which would blur the timing this test is about).
            busy = asyncio.create_task(keep_redis_busy(admin, 100_000))
            await asyncio.sleep(0.005)
            started = time.perf_counter()
            answer = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=2000)
            elapsed = time.perf_counter() - started
            await busy
        await admin.aclose()
    assert answer["rows"][0]["statuses"] == ["PRESENT", "PRESENT"], answer["backends"]
    # Each backend took about 100 ms for real; together they took about as long as one.
    assert answer["backends"]["hot"]["ms"] >= 85
    assert answer["backends"]["bulk"]["ms"] >= 85
    assert elapsed < 0.2, answer["backends"]


async def test_redis_down_at_start_is_used_once_it_answers(gateway: GatewayFactory, names: Names) -> None:
    server = RedisProcess()
    hot = names.backend("redis", url=server.url)
    try:
        async with gateway(names.registry(hot, names.backend("sqlite")), migrate_retry_s=0.1) as client:
            ready = await client.get("/readyz")
            down = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES)
            server.start()

            async def answers() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(answers)
            await write(client, "live", [live_row(1, 3)])
            up = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES)
    finally:
        server.stop()
    assert ready.status_code == 503
    assert "hot" in ready.json()["detail"]
    assert down["rows"][0]["statuses"] == ["UNAVAILABLE", "MISSING"]
    assert up["rows"][0]["statuses"] == ["PRESENT", "MISSING"]


async def test_postgres_down_at_start_gets_its_table_when_it_answers(gateway: GatewayFactory, names: Names) -> None:
    proxy = TcpProxy(target_port=5432)
    bulk = names.backend("cockroach", dsn=f"postgresql://root@127.0.0.1:{proxy.port}/test")
    async with gateway(names.registry(names.backend("sqlite"), bulk), migrate_retry_s=0.1) as client:
        ready = await client.get("/readyz")
        async with running(proxy):

            async def migrated() -> bool:
                return bool(client.app.state.gateway.migrated["bulk"])  # type: ignore[attr-defined]

            await eventually(migrated)  # the background retry created the table, no /readyz needed
            await write(client, "history", [{"consumer_id": 1, "lifetime_orders": 5, "lifetime_value": None}])
            up = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES)
    assert ready.status_code == 503
    assert ready.json()["backends"]["bulk"] != "ok"
    assert up["rows"][0]["statuses"] == ["MISSING", "PRESENT"]
    assert up["rows"][0]["values"] == [0, 5]
