"""Backend specifics a user relies on: key expiry, DDL per dialect, cleanup, reconnecting."""

from __future__ import annotations

import asyncio
import http.server
import threading
from datetime import timedelta
from typing import Any

import asyncpg
import redis.asyncio as redis

from app.registry.load import parse_registry
from backends import open_backend
from backends.cockroach import CockroachBackend, create_table_sql
from tests.support.clients import fetch, live_row, stamp, write
from tests.support.gateways import GatewayFactory
from tests.support.registries import PG_DSN, REDIS_URL, Names
from tests.support.servers import RedisProcess


async def test_redis_keys_expire_at_their_reclaim_time(gateway: GatewayFactory, names: Names) -> None:
    """ttl + grace after the event time (1 h + 1 h here): Redis frees the memory when the value reads MISSING."""
    async with gateway(names.registry(names.backend("redis"))) as client:
        await write(client, "live", [live_row(1, 1)])
        await write(client, "stores", [{"store_id": "s", "open_orders": 1}])
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        live_ttl = await admin.pttl(f"{names.prefix}live:1")
        stores_ttl = await admin.pttl(f"{names.prefix}stores:s")
    finally:
        await admin.aclose()
    assert 7_190_000 < live_ttl <= 7_200_000
    assert stores_ttl == -1  # a group without ttl never expires


def test_cockroach_dialect_ddl() -> None:
    cockroach = create_table_sql('"s"."t"', "cockroach")
    assert "PRIMARY KEY (grp, entity_key) USING HASH" in cockroach
    assert "ttl_expiration_expression = 'expires_at'" in cockroach
    postgres = create_table_sql('"s"."t"', "postgres")
    assert "USING HASH" not in postgres
    assert "ttl_" not in postgres


async def test_migrate_is_idempotent_and_detects_postgres(names: Names) -> None:
    registry = parse_registry(names.registry(names.backend("cockroach").replace("dialect: postgres", "dialect: auto")))
    backend = open_backend(registry.backends["hot"], registry)
    assert isinstance(backend, CockroachBackend)
    try:
        await backend.migrate()
        await backend.migrate()
        assert backend.dialect == "postgres"
    finally:
        await backend.aclose()


async def test_postgres_cleanup_deletes_only_reclaimable_rows(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("cockroach"))) as client:
        await write(client, "live", [live_row(1, 1, at=stamp(-timedelta(hours=2, minutes=1)))])  # 1 h ttl + 1 h grace
        await write(client, "live", [live_row(2, 1, at=stamp(-timedelta(hours=1, minutes=59)))])  # EXPIRED, kept
        await write(client, "history", [{"consumer_id": 1, "lifetime_orders": 2, "lifetime_value": 1.0}])
        backend = client.app.state.gateway.backends["hot"]  # type: ignore[attr-defined]
        deleted = await backend.delete_reclaimable(1000)
        answer = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d", "history:*"])
        kept = await fetch(client, entities={"consumer_id": [2]}, features=["live:orders_7d"])
    assert deleted == 1
    assert answer["rows"][0]["statuses"] == ["MISSING", "PRESENT", "PRESENT"]
    assert kept["rows"][0]["statuses"] == ["EXPIRED"]


async def test_redis_restart_needs_no_gateway_restart(gateway: GatewayFactory, names: Names) -> None:
    server = RedisProcess()
    server.start()
    try:
        async with gateway(names.registry(names.backend("redis", url=server.url))) as client:
            await write(client, "live", [live_row(1, 1)])
            before = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
            server.stop()
            server.start()  # same port, empty (it keeps nothing on disk)
            after = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
            await write(client, "live", [live_row(1, 2, at=stamp())])
            again = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
    finally:
        server.stop()
    assert before["rows"][0]["statuses"] == ["PRESENT"]
    # The pooled connection died with the server; one immediate reconnect serves the request.
    assert after["backends"]["hot"]["status"] == "ok", after["backends"]
    assert after["rows"][0]["statuses"] == ["MISSING"]
    assert again["rows"][0]["values"] == [2]


def still_open(conn: asyncpg.Connection) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # closed: asyncpg gave it back to the pool and detached it
        return False


async def test_postgres_sessions_terminated_need_no_gateway_restart(gateway: GatewayFactory, names: Names) -> None:
    """An operator or a failover ends every session, kept between reads too: the next read opens a new one."""
    async with gateway(names.registry(names.backend("cockroach"))) as client:
        await write(client, "live", [live_row(1, 1)])
        asked = {"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}
        await asyncio.gather(*(fetch(client, **asked) for _ in range(4)))  # several connections kept for reads
        backend = client.app.state.gateway.backends["hot"]  # type: ignore[attr-defined]
        kept = len(backend._reading)
        admin = await asyncpg.connect(PG_DSN)
        try:
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'feature-gateway:hot'"
            )
        finally:
            await admin.close()
        for _ in range(500):  # until this process has read the end of every kept session (within 10 s)
            if not any(still_open(conn) for conn in backend._reading):
                break
            await asyncio.sleep(0.02)
        after = [await fetch(client, **asked) for _ in range(4)]
    assert kept >= 2
    assert ended >= kept
    assert [a["backends"]["hot"]["status"] for a in after] == ["ok"] * 4, [a["backends"] for a in after]
    assert [a["rows"][0]["statuses"] for a in after] == [["PRESENT"]] * 4


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, int]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        size = int(self.headers.get("content-length", 0))
        self.rfile.read(size)
        self.received.append((self.path, self.headers.get("content-type", ""), size))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_spans_are_exported_over_otlp_http(gateway: GatewayFactory, names: Names) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.received.clear()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        async with gateway(names.registry(names.backend("sqlite")), otlp_endpoint=endpoint) as client:
            await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
        # Leaving the app flushed the batch processor.
    finally:
        server.shutdown()
        server.server_close()
    assert _Collector.received, "no spans arrived"
    path, content_type, size = _Collector.received[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert size > 0
