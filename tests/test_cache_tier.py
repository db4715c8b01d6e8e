"""A group's cache in front of its system of record (issue 14): read-through with promotion, write-through with
the never-older rule, and what each side's failure does. Redis caches, PostgreSQL is the system of record;
either is taken down for real (a proxy that stops, a Redis that refuses writes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from tests.support.gateways import GatewayFactory
from tests.support.registries import PG_DSN, Names
from tests.support.servers import RedisProcess, TcpProxy
from tests.support.waiting import eventually


def registry(names: Names, cache_url: str, dsn: str = PG_DSN, ttl: str = "1h") -> str:
    return f"""
backends:
  bulk: {names.backend("cockroach", dsn=dsn)}
  hot: {names.backend("redis", url=cache_url)}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  history:
    entity: consumer
    backend: bulk
    cache: {{backend: hot, ttl: {ttl}}}
    features:
      orders: {{dtype: int64, default: -1}}
      basket: {{dtype: float64, default: 0.0}}
"""


FEATURES = ["history:orders", "history:basket"]


def rows(ids: range, orders: int, at: str = "2026-11-30T10:00:00Z") -> list[dict[str, Any]]:
    return [{"consumer_id": i, "event_timestamp": at, "orders": orders + i, "basket": 1.5} for i in ids]


async def write(client: httpx.AsyncClient, body: list[dict[str, Any]]) -> dict[str, Any]:
    response = await client.post("/v1/features/write", json={"group": "history", "rows": body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def fetch(client: httpx.AsyncClient, ids: list[int]) -> httpx.Response:
    response = await client.post("/v1/features/fetch", json={"entities": {"consumer_id": ids}, "features": FEATURES})
    assert response.status_code == 200, response.text
    return response


def orders(response: httpx.Response) -> list[tuple[Any, str]]:
    return [(row["values"][0], row["statuses"][0]) for row in response.json()["rows"]]


def cache_timing(response: httpx.Response) -> str:
    return next(p for p in response.headers["server-timing"].split(", ") if p.startswith("bulk.cache;"))


@asynccontextmanager
async def stopped(proxy: TcpProxy) -> AsyncIterator[TcpProxy]:
    try:
        yield proxy
    finally:
        await proxy.stop()


@asynccontextmanager
async def cache_client(url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def metric(client: httpx.AsyncClient, family: str, result: str) -> int:
    text = (await client.get("/metrics")).text
    line = f'feature_gateway_{family}{{group="history",result="{result}"}} '
    return next((int(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0)


async def settled(client: httpx.AsyncClient, at_least: int) -> bool:
    return await metric(client, "cache_writes_total", "settled") >= at_least


async def test_misses_are_read_from_the_system_of_record_and_promoted(gateway: GatewayFactory, names: Names) -> None:
    from tests.support.registries import REDIS_URL

    async with gateway(registry(names, REDIS_URL)) as client, cache_client(REDIS_URL) as cache:
        await write(client, rows(range(1, 11), 100))
        cached = [f"{names.prefix}history:{i}" for i in range(1, 11)]
        assert await cache.exists(*cached) == 10  # written through
        ttl_ms = await cache.pttl(cached[0])
        assert 0 < ttl_ms <= 3600 * 1000  # the cache's ttl, not the group's (it has none)
        await cache.delete(*cached[:4])  # evicted by the LRU, say

        response = await fetch(client, [1, 2, 3, 4, 5, 99])
        assert orders(response) == [(101, "PRESENT"), (102, "PRESENT"), (103, "PRESENT"), (104, "PRESENT"),
                                     (105, "PRESENT"), (-1, "MISSING")]  # fmt: skip
        assert response.json()["degraded"] is False
        assert 'desc="hot 1 hit 5 miss"' in cache_timing(response)

        async def promoted() -> bool:
            return bool(await cache.exists(*cached[:4]) == 4)

        await eventually(promoted, within=10)  # in the background
        assert 0 < await cache.pttl(cached[0]) <= 3600 * 1000

        response = await fetch(client, [1, 2, 3, 4, 5])
        assert 'desc="hot 5 hit 0 miss"' in cache_timing(response)
        assert await metric(client, "cache_lookups_total", "hit") == 6
        assert await metric(client, "cache_lookups_total", "miss") == 5
        assert await metric(client, "cache_promotions_total", "written") == 4
        assert await metric(client, "cache_writes_total", "written") == 10


async def test_a_write_replaces_the_cached_copy_and_an_older_one_is_skipped(
    gateway: GatewayFactory, names: Names
) -> None:
    from tests.support.registries import REDIS_URL

    async with gateway(registry(names, REDIS_URL)) as client:
        await write(client, rows(range(1, 4), 100, "2026-11-30T10:00:00Z"))
        assert orders(await fetch(client, [1]))[0] == (101, "PRESENT")
        await write(client, rows(range(1, 4), 200, "2026-11-30T11:00:00Z"))
        assert orders(await fetch(client, [1, 2, 3])) == [(201, "PRESENT"), (202, "PRESENT"), (203, "PRESENT")]
        result = await write(client, rows(range(1, 4), 300, "2026-11-30T09:00:00Z"))  # older: skipped by both
        assert result["skipped_stale"] == 3
        assert orders(await fetch(client, [1, 2, 3])) == [(201, "PRESENT"), (202, "PRESENT"), (203, "PRESENT")]


async def test_with_the_cache_down_reads_and_writes_go_to_the_system_of_record(
    gateway: GatewayFactory, names: Names
) -> None:
    server = RedisProcess()
    server.start()
    try:
        proxy = TcpProxy(server.port)
        await proxy.start()
        async with gateway(registry(names, f"redis://127.0.0.1:{proxy.port}/0")) as client, stopped(proxy):
            await write(client, rows(range(1, 6), 100))
            await proxy.stop()  # the cache is down
            response = await fetch(client, [1, 2, 3])
            assert orders(response) == [(101, "PRESENT"), (102, "PRESENT"), (103, "PRESENT")]
            assert response.json()["degraded"] is False
            await write(client, rows(range(1, 6), 500, "2026-11-30T12:00:00Z"))  # the write succeeds
            assert orders(await fetch(client, [1]))[0] == (501, "PRESENT")
            assert await metric(client, "cache_lookups_total", "error") >= 3
            # Back up, the cache still holds the copies written before the outage: none may be served until
            # this worker has written the new rows there
            await proxy.start()
            for _ in range(20):
                assert orders(await fetch(client, [1, 2]))[:2] == [(501, "PRESENT"), (502, "PRESENT")]
            await eventually(lambda: settled(client, 5), within=10)
            async with cache_client(server.url) as cache:
                cached = await cache.get(f"{names.prefix}history:3")
            assert cached is not None
            response = await fetch(client, [3])
            assert orders(response)[0] == (503, "PRESENT")
            assert 'desc="hot 1 hit 0 miss"' in cache_timing(response)
    finally:
        server.stop()


async def test_a_cache_that_refuses_writes_never_serves_an_older_value(gateway: GatewayFactory, names: Names) -> None:
    """Redis out of memory answers reads and refuses writes: the written rows are held dirty (read from the
    system of record, not promoted) until the cache takes them."""
    server = RedisProcess()
    server.start()
    try:
        async with gateway(registry(names, server.url)) as client, cache_client(server.url) as cache:
            await write(client, rows(range(1, 6), 100))
            await cache.config_set("maxmemory-policy", "noeviction")
            await cache.config_set("maxmemory", 1)
            await write(client, rows(range(1, 6), 700, "2026-11-30T12:00:00Z"))
            for _ in range(5):  # the cache answers reads with the older copies: never served
                assert orders(await fetch(client, [1, 2, 3, 4, 5])) == [(701 + i, "PRESENT") for i in range(5)]
            assert await metric(client, "cache_writes_total", "failed") >= 5
            await cache.config_set("maxmemory", 0)  # it takes writes again: the held rows land
            await eventually(lambda: settled(client, 5), within=10)
            response = await fetch(client, [1, 2, 3, 4, 5])
            assert orders(response) == [(701 + i, "PRESENT") for i in range(5)]
            assert 'desc="hot 5 hit 0 miss"' in cache_timing(response)
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["refused", "circuit"])
async def test_with_the_system_of_record_down_cached_values_are_served(
    gateway: GatewayFactory, names: Names, how: str
) -> None:
    from tests.support.registries import REDIS_URL

    pg_port = int(PG_DSN.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(pg_port)
    await proxy.start()
    dsn = f"postgresql://root@127.0.0.1:{proxy.port}/test"
    settings = {"breaker_failures": 2} if how == "circuit" else {}
    try:
        async with gateway(registry(names, REDIS_URL, dsn=dsn), **settings) as client:
            await write(client, rows(range(1, 4), 100))
            await proxy.stop()  # PostgreSQL is down; keys 1-3 are in the cache, 4 is not
            if how == "circuit":
                for _ in range(3):  # open its read circuit: then it is not even asked
                    await fetch(client, [7])
            response = await fetch(client, [1, 2, 3, 4])
            assert orders(response) == [(101, "PRESENT"), (102, "PRESENT"), (103, "PRESENT"), (-1, "UNAVAILABLE")]
            answer = response.json()
            assert answer["degraded"] is True
            backend = answer["backends"]["bulk"]
            assert backend["status"] == ("open" if how == "circuit" else "error")
    finally:
        await proxy.stop()
