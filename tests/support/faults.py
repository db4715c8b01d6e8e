"""Making a backend fail for real: a port nothing listens on, a Redis paused or kept busy by a script, a
PostgreSQL table locked by another session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import redis.asyncio as redis

from tests.support.registries import PG_DSN, REDIS_URL, Names
from tests.support.servers import free_port


def closed_backend(kind: str, names: Names) -> str:
    """A backend of `kind` ("redis", "cockroach" or "sqlite") that cannot be reached: connecting is refused,
    or (SQLite) its folder is a file."""
    port = free_port()
    if kind == "redis":
        return names.backend("redis", url=f"redis://127.0.0.1:{port}/0")
    if kind == "cockroach":
        return names.backend("cockroach", dsn=f"postgresql://root@127.0.0.1:{port}/test")
    blocker = names.dir / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    return f'{{type: sqlite, path: "{blocker / "db.sqlite"}"}}'


@asynccontextmanager
async def redis_paused(ms: int) -> AsyncIterator[None]:
    """Every Redis client waits `ms` (CLIENT PAUSE): a real slow Redis."""
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        await admin.execute_command("CLIENT", "PAUSE", ms, "ALL")
        yield
    finally:
        await asyncio.sleep(ms / 1000)
        await admin.aclose()


REDIS_SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1])
return 1
"""
"""A Lua script that spins for ARGV[1] microseconds: Redis answers no one meanwhile, and exactly that long
(a CLIENT PAUSE ends only at the server's next cron tick, up to 100 ms late)."""


def keep_redis_busy(client: redis.Redis, microseconds: int) -> Awaitable[Any]:
    """Run REDIS_SPIN on `client`'s server for `microseconds` (await it, or make it a task)."""
    return client.eval(REDIS_SPIN, 0, microseconds)  # type: ignore[arg-type]


@asynccontextmanager
async def postgres_locked(names: Names, seconds: float) -> AsyncIterator[None]:
    """Reads of the gateway's table wait while another session holds a lock through `pg_sleep`."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(f'LOCK TABLE "{names.schema}".feature_values IN ACCESS EXCLUSIVE MODE')

        async def hold() -> None:
            await conn.execute(f"SELECT pg_sleep({seconds})")
            await transaction.rollback()

        holder = asyncio.create_task(hold())
        yield
        await holder
    finally:
        await conn.close()
