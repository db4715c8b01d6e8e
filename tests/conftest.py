"""Fixtures on the real Redis and PostgreSQL of this machine; each test gets its own key prefix and schema.

Only fixtures and hooks live here; the helpers tests import are in `tests/support/`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis
import uvloop

from tests.support.gateways import GatewayFactory, in_process_gateway
from tests.support.registries import KINDS, PG_DSN, REDIS_URL, Names
from tests.support.servers import RedisClusterProcesses


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Tests run on uvloop, as the server does (its transports differ from asyncio's in small ways)."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def names(tmp_path: Path) -> Names:
    return Names(tmp_path)


@pytest.fixture(autouse=True)
async def _cleanup(names: Names) -> AsyncIterator[None]:
    yield
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{names.prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{names.schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def gateway() -> GatewayFactory:
    """`async with gateway(registry_yaml, **settings) as client:` a running app and an httpx client to it."""
    return in_process_gateway


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A 3-master Redis Cluster of the test run's own, started by the first test that asks for it."""
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterProcesses, names: Names) -> RedisClusterProcesses:
    """The session's cluster, healthy (a test may have stopped a node), and `names` pointed at it."""
    redis_cluster_session.wait_ok()
    names.cluster_url = redis_cluster_session.url
    return redis_cluster_session


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis_cluster":
        request.getfixturevalue("redis_cluster")  # lazy: only tests that run on the cluster start it
    return str(request.param)
