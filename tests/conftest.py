"""Fixtures on the real Redis and PostgreSQL of this machine; each test gets its own key prefix and schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis
import uvloop

from app.main import create_app
from app.registry.load import parse_registry
from app.settings import Settings
from tests.support import RedisClusterProcesses

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
KINDS = ["redis", "redis_cluster", "cockroach", "sqlite"]

FEATURES = """
      orders_7d: {dtype: int64, default: 0}
      avg_basket: {dtype: float64, default: 0.5}
      active: {dtype: bool, default: false}
      name: {dtype: string, default: none}
      raw: {dtype: bytes}
      embedding: {dtype: "float32[3]"}
      ids: {dtype: "int64[2]", default: [0, 0]}
"""


class Names:
    """Per-test isolation: a Redis key prefix, a PostgreSQL schema and a folder for SQLite."""

    def __init__(self, tmp_path: Path):
        uid = uuid.uuid4().hex[:12]
        self.prefix = f"test:{uid}:"
        self.schema = f"t_{uid}"
        self.dir = tmp_path
        self.cluster_url: str | None = None  # set by the `redis_cluster` fixture

    def backend(self, kind: str, *, url: str | None = None, dsn: str | None = None, file: str = "db") -> str:
        if kind == "redis":
            return f'{{type: redis, url: "{url or REDIS_URL}", key_prefix: "{self.prefix}", timeout_ms: 2000}}'
        if kind == "redis_cluster":
            url = url or self.cluster_url
            assert url, "request the redis_cluster fixture (it starts the cluster) before a redis_cluster backend"
            return f'{{type: redis, cluster: true, url: "{url}", key_prefix: "{self.prefix}", timeout_ms: 2000}}'
        if kind == "cockroach":
            return f'{{type: cockroach, dsn: "{dsn or PG_DSN}", schema: {self.schema}, dialect: postgres}}'
        return f'{{type: sqlite, path: "{self.dir / (file + ".sqlite")}"}}'

    def registry(self, hot: str, bulk: str | None = None) -> str:
        """`live` and `stores` on hot; `history` on bulk (hot again when not given)."""
        return f"""
backends:
  hot: {hot}
  bulk: {bulk or hot}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
  store: {{join_key: store_id, dtype: string}}
groups:
  live:
    entity: consumer
    backend: hot
    ttl: 1h
    features:{FEATURES}
  history:
    entity: consumer
    backend: bulk
    ttl: 30d
    features:
      lifetime_orders: {{dtype: int64, default: -1}}
      lifetime_value: {{dtype: float64}}
  stores:
    entity: store
    backend: hot
    features:
      open_orders: {{dtype: int64, default: 0}}
"""


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


GatewayFactory = Callable[..., Any]


@pytest.fixture
def gateway() -> GatewayFactory:
    """`async with gateway(registry_yaml, **settings) as client:` a running app and an httpx client to it."""

    @asynccontextmanager
    async def make(registry_yaml: str, *, exporter: Any = None, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        registry = parse_registry(registry_yaml, "test-registry", env={})
        # Tests about deadlines set them; the rest must not turn UNAVAILABLE because a loaded CI box was slow.
        settings.setdefault("default_deadline_ms", 2000)
        app = create_app(Settings(**settings), registry=registry, span_exporter=exporter)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client

    return make


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
