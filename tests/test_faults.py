"""Backends that are down, slow, or come back: the answer degrades, the service does not."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.clients import fetch, live_row, write
from tests.support.faults import closed_backend, postgres_table_locked, reads_waiting_on_the_lock, redis_paused
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names
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
        # Under a 1 s deadline: a backend still trying when it passes would be cut off ("timeout"), not "error".
        answer = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=1000)
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
    assert answer["backends"]["bulk"]["status"] == "error"  # it failed by itself, before the deadline
    assert answer["backends"]["hot"]["status"] == "ok"
    assert strict.status_code == 503
    assert strict.headers["content-type"] == "application/problem+json"
    assert "bulk" in strict.json()["detail"]
    assert ready.status_code == 503
    assert ready.json()["backends"]["hot"] == "ok"
    assert ready.json()["backends"]["bulk"] != "ok"
    assert "bulk" in ready.json()["detail"]
    assert write_down.status_code == 503
    assert write_down.headers["content-type"] == "application/problem+json"


REDIS_PAUSE_MS = 1000  # far longer than the 80 ms deadline, so the fetch is inside the pause however late it runs


async def test_backend_missing_the_deadline_is_unavailable(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis"), names.backend("cockroach"))) as client:
        await seed(client)
        started = time.perf_counter()
        async with redis_paused(REDIS_PAUSE_MS):
            slow_redis = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=80)
        redis_elapsed = time.perf_counter() - started
        # The lock goes only when this block ends, so no read of the table can finish inside it: answers that
        # come back inside it were not waiting for the slow read, which the deadline cut off.
        async with postgres_table_locked(names):
            slow_pg = await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=80)
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
    assert slow_pg["backends"]["hot"]["status"] == "ok"
    assert slow_pg["degraded"] is True
    assert redis_elapsed >= REDIS_PAUSE_MS / 1000  # the pause was real (the context waits it out)
    assert strict.status_code == 503
    # Cancelled reads left no connection holding a stale reply: the next answer is whole and right.
    assert after["rows"][0]["statuses"] == ["PRESENT", "PRESENT"]
    assert after["rows"][0]["values"] == [3, 9]


async def test_backends_are_read_concurrently(gateway: GatewayFactory, names: Names) -> None:
    """Each backend is held until the test lets it go, and PostgreSQL and Redis each report what they were
    asked meanwhile: the reads of one request were both in flight at the same time."""
    store = RedisProcess()
    store.start()
    try:
        # Timeouts and the deadline far above anything this test waits: only the test ends the holds.
        hot = names.backend("redis", url=store.url).replace("timeout_ms: 2000", "timeout_ms: 10000")
        bulk = names.backend("cockroach").replace("dialect: postgres", "dialect: postgres, timeout_ms: 10000")
        async with gateway(names.registry(hot, bulk)) as client:
            await seed(client)
            await fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=10_000)  # connected
            mgets = store.calls("MGET")
            async with postgres_table_locked(names):
                store.freeze()
                try:
                    fetching = asyncio.create_task(
                        fetch(client, entities={"consumer_id": [1]}, features=FEATURES, deadline_ms=10_000)
                    )
                    # PostgreSQL has the read, although Redis has not answered its own: not Redis first, then it.
                    await eventually(lambda: reads_waiting_on_the_lock(names))
                finally:
                    store.thaw()

                # Redis answers the read it was sent while frozen, while PostgreSQL still holds its own: not
                # PostgreSQL first, then Redis.
                async def redis_answered() -> bool:
                    return await asyncio.to_thread(store.calls, "MGET") > mgets

                await eventually(redis_answered)
                assert await reads_waiting_on_the_lock(names) == 1
                assert not fetching.done(), "answered before every backend did"
            answer = await fetching
    finally:
        store.stop()
    assert answer["rows"][0]["statuses"] == ["PRESENT", "PRESENT"], answer["backends"]
    assert answer["rows"][0]["values"] == [3, 9]


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
