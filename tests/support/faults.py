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
async def postgres_table_locked(names: Names) -> AsyncIterator[None]:
    """The gateway's table locked by another session for as long as the block runs: reads of it wait, until
    the block ends and the lock goes (an answer that comes inside the block did not wait for them)."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        async with conn.transaction():  # rolled back or committed at the end: nothing was written
            await conn.execute(f'LOCK TABLE "{names.schema}".feature_values IN ACCESS EXCLUSIVE MODE')
            yield
    finally:
        await conn.close()


async def reads_waiting_on_the_lock(names: Names) -> int:
    """How many SELECTs of the test's table wait for its lock (PostgreSQL's own view of its sessions)."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT %' "
            "AND position($1 in query) > 0",
            f'"{names.schema}".',
        )
    finally:
        await conn.close()
    return int(count)
