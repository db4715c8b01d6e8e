"""CockroachDB (and PostgreSQL, which speaks the same protocol) through an asyncpg pool.

One row per (group, entity): the packed blob plus its event time and expiry, primary key (grp, entity_key).
Every statement here runs on both databases; `dialect: cockroach` (or `auto` finding CockroachDB) adds a
hash-sharded primary key, against hot ranges from sequential ids, and row-level TTL on `expires_at`.
On PostgreSQL a background task deletes expired rows in small batches instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from app.registry.model import BackendSpec, Group
from backends import options as check
from backends.base import (
    BackendKind,
    Fold,
    Footprint,
    Option,
    Scanned,
    TileRef,
    WriteResult,
    WriteRow,
    reclaim_us,
    tile_spans,
)
from backends.reclaim import reclaim_loop

log = logging.getLogger(__name__)

_WRITE_ATTEMPTS = 5


async def _session_untouched(conn: asyncpg.Connection) -> None:
    """Pool release hook. The default runs `RESET ALL; UNLISTEN *; CLOSE ALL; ...` on every release: a second
    round trip per read, awaited by the caller. The gateway never changes session state (single statements,
    no SET, LISTEN, cursors or advisory locks), and asyncpg still rolls back a transaction left open."""


def create_table_sql(table: str, dialect: str) -> str:
    columns = (
        "grp TEXT NOT NULL, entity_key TEXT NOT NULL, event_us INT8 NOT NULL, "
        "expires_at TIMESTAMPTZ, payload BYTEA NOT NULL"
    )
    if dialect == "cockroach":
        # Hash-sharded: sequential ids would otherwise pile writes onto one range.
        return (
            f"CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY (grp, entity_key) USING HASH) "
            "WITH (ttl_expiration_expression = 'expires_at', ttl_job_cron = '@hourly')"
        )
    return f"CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY (grp, entity_key))"


def create_stream_tables_sql(tiles: str, events: str, dialect: str) -> list[str]:
    """The streaming groups' tables (backends/base.py TileStore): partial aggregates per tile (a null `partials` is
    a placeholder row that exists only so a first write can lock it), and the event ids seen."""
    ttl = " WITH (ttl_expiration_expression = 'expires_at', ttl_job_cron = '@hourly')" if dialect == "cockroach" else ""
    return [
        f"CREATE TABLE IF NOT EXISTS {tiles} (grp TEXT NOT NULL, entity_key TEXT NOT NULL, tile_s INT8 NOT NULL, "
        "tile_start INT8 NOT NULL, expires_at TIMESTAMPTZ NOT NULL, partials BYTEA, "
        f"PRIMARY KEY (grp, entity_key, tile_s, tile_start)){ttl}",
        f"CREATE TABLE IF NOT EXISTS {events} (grp TEXT NOT NULL, event_id TEXT NOT NULL, "
        f"expires_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (grp, event_id)){ttl}",
    ]


def each_host(hosts: Sequence[tuple[str, int | None]]) -> Callable[..., Awaitable[asyncpg.Connection]]:
    """Connect to the first of several hosts that answers, giving each the whole connect timeout.

    asyncpg tries a multi-host DSN's hosts in order but under one timeout for all of them, so a first host
    that accepts and then hangs (a stopped node) uses it up and the next is never tried; one that refuses
    (a dead process) is skipped either way.
    """

    async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
        error: BaseException | None = None
        for host, port in hosts:
            try:
                return await asyncpg.connect(dsn, host=host, port=port, **kwargs)
            except (OSError, TimeoutError) as exc:  # refused, unreachable, or no answer within the timeout
                error = exc
        assert error is not None
        raise error

    return connect


def _timestamp(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


class CockroachBackend:
    type = "cockroach"
    in_process = False

    def __init__(self, spec: BackendSpec, groups: Sequence[Group]):
        options = spec.options
        self.name = spec.name
        self.options = options
        self.dialect: str = options["dialect"]
        self.table = f'"{options["schema"]}"."{options["table"]}"'
        self.tiles_table = f'"{options["schema"]}"."{options["table"]}_tiles"'
        self.events_table = f'"{options["schema"]}"."{options["table"]}_events"'
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        # Connections reads keep between reads, out of the pool: acquiring and releasing through the pool's
        # queue and holders cost about 30% of a read's client CPU (py-spy, 1 x 100 fetches). At most half the
        # pool, so writes, migrations and the cleanup always find connections there.
        self._reading: list[asyncpg.Connection] = []
        self._keep = max(1, options["pool_size"] // 2)
        self._closing = False
        self._cleanup: asyncio.Task[None] | None = None
        self._read_sql: dict[int, str] = {}
        # Rows go in sorted by key, so concurrent batches lock the rows they share in one order and can only
        # queue behind each other, never deadlock (40P01). A stored row past its reclaim time ($6, the gateway's
        # clock) counts as absent, as on Redis, where its key is gone by then.
        upsert = (
            f"INSERT INTO {self.table} AS cur (grp, entity_key, event_us, expires_at, payload) "
            "SELECT $1, k, e, x, p FROM unnest($2::text[], $3::int8[], $4::timestamptz[], $5::bytea[]) "
            "AS r(k, e, x, p) ORDER BY k "
            "ON CONFLICT (grp, entity_key) DO UPDATE SET event_us = excluded.event_us, "
            "expires_at = excluded.expires_at, payload = excluded.payload "
            "WHERE cur.event_us COMPARE excluded.event_us OR cur.expires_at < $6::timestamptz RETURNING 1"
        )
        self._write_sql = upsert.replace("COMPARE", "<=")
        self._copy_sql = upsert.replace("COMPARE", "<")  # a copy never replaces a row of the same time

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    # min_size=0: creating the pool opens no connection, so a database that is down
                    # does not stop start-up; connections are opened on first use and kept.
                    hosts = check.url_hosts(self.options["dsn"])
                    self._pool = await asyncpg.create_pool(
                        self.options["dsn"],
                        connect=each_host(hosts) if len(hosts) > 1 else None,
                        min_size=0,
                        max_size=self.options["pool_size"],
                        timeout=self.options["connect_timeout_ms"] / 1000,
                        command_timeout=self.options["timeout_ms"] / 1000,
                        server_settings={"application_name": f"feature-gateway:{self.name}"},
                        reset=_session_untouched,
                    )
                    # With the pool, not with migrate(): a gateway started with migrate_on_start off cleans too.
                    self._cleanup = asyncio.create_task(
                        reclaim_loop(self.name, self.options["cleanup_interval"], self._reclaim_batch),
                        name=f"cleanup:{self.name}",
                    )
        return self._pool

    def _read_statement(self, groups: int) -> str:
        sql = self._read_sql.get(groups)
        if sql is None:
            parts = [
                f"SELECT {i} AS i, entity_key, payload FROM {self.table} "
                f"WHERE grp = ${2 * i + 1} AND entity_key = ANY(${2 * i + 2}::text[])"
                for i in range(groups)
            ]
            sql = self._read_sql[groups] = " UNION ALL ".join(parts)
        return sql

    async def detect_dialect(self) -> None:
        pool = await self.pool()
        version = await pool.fetchval("SELECT version()")
        self.dialect = "cockroach" if "CockroachDB" in version else "postgres"

    async def migrate(self) -> None:
        if self.dialect == "auto":
            await self.detect_dialect()
        pool = await self.pool()
        async with pool.acquire() as conn:
            for ddl in (
                f'CREATE SCHEMA IF NOT EXISTS "{self.options["schema"]}"',
                create_table_sql(self.table, self.dialect),
                *create_stream_tables_sql(self.tiles_table, self.events_table, self.dialect),
            ):
                try:
                    await conn.execute(ddl)
                except asyncpg.UniqueViolationError:
                    pass  # another gateway created it at the same moment (PostgreSQL's catalog race)

    async def read(self, reads: Sequence[tuple[Group, Sequence[str]]]) -> list[list[bytes | None]]:
        args: list[Any] = []
        for group, keys in reads:
            args += [group.name, list(keys)]
        pool = await self.pool()
        conn = await self._kept(pool) or await pool.acquire()
        try:
            records = await conn.fetch(self._read_statement(len(reads)), *args)
        except BaseException:
            # Failed or cancelled (a deadline) mid-query: the pool's release waits out the cancellation, rolls
            # back and closes what is broken, as when the pool held it for the read (shielded within).
            await pool.release(conn)
            raise
        if len(self._reading) < self._keep and not self._closing:
            self._reading.append(conn)
        else:
            await pool.release(conn)
        found: list[dict[str, bytes]] = [{} for _ in reads]
        for record in records:
            found[record[0]][record[1]] = record[2]
        return [[hits.get(k) for k in keys] for hits, (_, keys) in zip(found, reads, strict=True)]

    async def _kept(self, pool: asyncpg.Pool) -> asyncpg.Connection | None:
        """A connection an earlier read kept, still open. One the server or the network closed while it was kept
        (a failover, pg_terminate_backend) is skipped: asyncpg has given it back to the pool already and detached
        it, so its methods raise, and the pool opens a new one on the next acquire."""
        while self._reading:
            conn = self._reading.pop()
            try:
                if not conn.is_closed():
                    return conn
            except asyncpg.InterfaceError:
                continue  # detached
            await pool.release(conn)  # closed, not yet detached: the pool's release does it
        return None

    async def write(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        return await self._upsert(self._write_sql, group, rows)

    async def copy(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        return await self._upsert(self._copy_sql, group, rows)

    async def _upsert(self, sql: str, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        expires = []
        for row in rows:
            at = reclaim_us(group, row.event_us)
            expires.append(None if at is None else _timestamp(at))
        args: list[Any] = [
            group.name,
            [r.key for r in rows],
            [r.event_us for r in rows],
            expires,
            [r.blob for r in rows],
        ]
        pool = await self.pool()
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                written = len(await pool.fetch(sql, *args, datetime.now(UTC)))
                return WriteResult(written, len(rows) - written)
            except asyncpg.TransactionRollbackError as exc:
                # Class 40: 40001 is CockroachDB asking the client to retry a contended transaction; 40P01, a
                # deadlock, cannot come from two of our writes (sorted keys) but can from another writer of the
                # table. Either way the statement was rolled back whole and is safe to send again.
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
                log.info("backend %s: write retried after %s", self.name, exc.sqlstate)
                await asyncio.sleep(0.01 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def scan(self, group: Group, cursor: str | None, limit: int) -> Scanned:
        pool = await self.pool()
        records = await pool.fetch(
            f"SELECT entity_key, event_us, payload FROM {self.table} WHERE grp = $1 AND entity_key > $2 "
            "ORDER BY entity_key LIMIT $3",
            group.name,
            cursor or "",
            limit,
        )
        rows = [WriteRow(r["entity_key"], r["event_us"], r["payload"]) for r in records]
        return Scanned(rows, rows[-1].key if len(rows) == limit else None)

    async def delete(self, group: Group, keys: Sequence[str]) -> None:
        pool = await self.pool()
        await pool.execute(
            f"DELETE FROM {self.table} WHERE grp = $1 AND entity_key = ANY($2::text[])", group.name, list(keys)
        )

    async def delete_reclaimable(self, limit: int) -> int:
        """Delete up to `limit` rows past their reclaim time from each table; how many went."""
        pool = await self.pool()
        deleted = 0
        for table, key in (
            (self.table, "grp, entity_key"),
            (self.tiles_table, "grp, entity_key, tile_s, tile_start"),
            (self.events_table, "grp, event_id"),
        ):
            status = await pool.execute(
                # SKIP LOCKED: a row a write holds is left for the next round rather than waited on, so a purge
                # never blocks (or deadlocks with) a write. The outer test re-checks the row as it is when deleted.
                f"DELETE FROM {table} WHERE expires_at < now() AND ({key}) IN "
                f"(SELECT {key} FROM {table} WHERE expires_at < now() LIMIT {int(limit)} FOR UPDATE SKIP LOCKED)"
            )
            deleted += int(status.split()[-1])
        return deleted

    async def apply(
        self,
        group: str,
        events: Mapping[str, str],
        tiles: Sequence[TileRef],
        fold: Fold,
        keep_us: int,
        tile_keep_us: Mapping[int, int],
    ) -> int:
        """TileStore.apply in one transaction. Event ids and tiles are taken in sorted order, and tiles no one has
        written yet get a placeholder row first, so that `FOR UPDATE` locks every tile the batch touches: two
        batches sharing tiles queue behind each other (never both folding into the same old value), and can
        only ever wait in one order."""
        refs = sorted(set(tiles))
        entities, sizes, starts = [r[0] for r in refs], [r[1] for r in refs], [r[2] for r in refs]
        expires = [_timestamp(at + size * 1_000_000 + tile_keep_us[size]) for _, size, at in refs]
        pool = await self.pool()
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    now = datetime.now(UTC)
                    rows = await conn.fetch(
                        f"INSERT INTO {self.events_table} (grp, event_id, expires_at) "
                        "SELECT $1, e, $3 FROM unnest($2::text[]) AS e ORDER BY e "
                        "ON CONFLICT DO NOTHING RETURNING event_id",
                        group,
                        sorted(events),
                        now + timedelta(microseconds=keep_us),
                    )
                    new = {r[0] for r in rows}
                    if not new:
                        return 0
                    unnested = "unnest($2::text[], $3::int8[], $4::int8[], $5::timestamptz[]) AS r(e, s, t, x)"
                    await conn.execute(
                        f"INSERT INTO {self.tiles_table} (grp, entity_key, tile_s, tile_start, expires_at) "
                        f"SELECT $1, e, s, t, x FROM {unnested} ORDER BY e, s, t ON CONFLICT DO NOTHING",
                        group,
                        entities,
                        sizes,
                        starts,
                        expires,
                    )
                    stored = await conn.fetch(
                        f"SELECT entity_key, tile_s, tile_start, partials FROM {self.tiles_table} "
                        "WHERE grp = $1 AND (entity_key, tile_s, tile_start) IN "
                        "(SELECT * FROM unnest($2::text[], $3::int8[], $4::int8[])) "
                        "ORDER BY entity_key, tile_s, tile_start FOR UPDATE",
                        group,
                        entities,
                        sizes,
                        starts,
                    )
                    old = {(r[0], r[1], r[2]): r[3] for r in stored if r[3] is not None}
                    written = fold(new, old)
                    keys = sorted(written)
                    await conn.execute(
                        f"UPDATE {self.tiles_table} AS cur SET partials = r.p, expires_at = r.x "
                        "FROM unnest($2::text[], $3::int8[], $4::int8[], $5::bytea[], $6::timestamptz[]) "
                        "AS r(e, s, t, p, x) "
                        "WHERE cur.grp = $1 AND cur.entity_key = r.e AND cur.tile_s = r.s AND cur.tile_start = r.t",
                        group,
                        [k[0] for k in keys],
                        [k[1] for k in keys],
                        [k[2] for k in keys],
                        [written[k] for k in keys],
                        [_timestamp(k[2] + k[1] * 1_000_000 + tile_keep_us[k[1]]) for k in keys],
                    )
                return len(new)
            except asyncpg.TransactionRollbackError as exc:  # as in write(): rolled back whole, safe to resend
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
                log.info("backend %s: tile batch retried after %s", self.name, exc.sqlstate)
                await asyncio.sleep(0.01 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def read_tiles(
        self, group: str, entities: Sequence[str], needed: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        """One statement: a primary-key range per (entity, tile size), the window's tiles being consecutive."""
        tiles = [(entity, size, start) for entity in entities for size, start in needed]
        spans = tile_spans(tiles)
        pool = await self.pool()
        rows = await pool.fetch(
            f"SELECT t.entity_key, t.tile_s, t.tile_start, t.partials FROM {self.tiles_table} AS t "
            "JOIN unnest($2::text[], $3::int8[], $4::int8[], $5::int8[]) AS r(e, s, lo, hi) "
            "ON t.grp = $1 AND t.entity_key = r.e AND t.tile_s = r.s AND t.tile_start BETWEEN r.lo AND r.hi",
            group,
            [e for e, _ in spans],
            [s for _, s in spans],
            [lo for lo, _ in spans.values()],
            [hi for _, hi in spans.values()],
        )
        found = {(r[0], r[1], r[2]): r[3] for r in rows}
        return [found.get(t) for t in tiles]

    async def _reclaim_batch(self, limit: int) -> int:
        if self.dialect == "auto":
            await self.detect_dialect()
        if self.dialect == "cockroach":
            return 0  # row-level TTL on expires_at does it
        return await self.delete_reclaimable(limit)

    async def ping(self) -> None:
        pool = await self.pool()
        await pool.fetchval("SELECT 1")

    def server_answered(self, exc: BaseException) -> bool:
        """A SQLSTATE error, except the classes that mean the server is going away or cannot take work:
        08 connection, 53 resources, 57 operator intervention."""
        return isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate or "")[:2] not in {"08", "53", "57"}

    async def aclose(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
        self._closing = True  # a read that ends now gives its connection back to the pool
        if self._pool is not None:
            kept, self._reading = self._reading, []
            for conn in kept:  # the pool's close waits for every connection it lent
                await self._pool.release(conn)
            await self._pool.close()

    async def footprints(self, groups: Sequence[Group], budget_s: float) -> dict[str, Footprint]:
        """Measured (backends/base.py), exactly: per group its rows, and per row the sum of `pg_column_size` of
        every column: the key (grp, entity_key), event time, expiry and the blob as stored (compressed, if the
        database compressed it). An aggregation group adds its rows of the tiles and event-id tables, measured
        the same way. Not counted: tuple headers (about 24 bytes a row), the primary-key index (which holds the
        key again), free space in pages, WAL, and CockroachDB's replicas (3 by default: 3 times the bytes on
        disk). Each group is one statement over its primary-key range, which reads every row of the group:
        it is cut off at `budget_s`."""
        pool = await self.pool()
        size = "coalesce(sum({}), 0)::INT8".format

        def table_sql(table: str, columns: str) -> str:
            total = " + ".join(f"coalesce(pg_column_size({c}), 0)" for c in columns.split())
            return f"SELECT count(*)::INT8, {size(total)} FROM {table} WHERE grp = $1"

        values = table_sql(self.table, "grp entity_key event_us expires_at payload")
        streaming = " UNION ALL ".join(
            [
                values,
                table_sql(self.tiles_table, "grp entity_key tile_s tile_start expires_at partials"),
                table_sql(self.events_table, "grp event_id expires_at"),
            ]
        )

        async def one(group: Group) -> Footprint:
            rows = await pool.fetch(streaming if group.streaming else values, group.name, timeout=budget_s)
            return Footprint(sum(r[0] for r in rows), sum(r[1] for r in rows), False)

        found = await asyncio.gather(*(one(g) for g in groups))
        return {g.name: f for g, f in zip(groups, found, strict=True)}


KIND = BackendKind(
    type="cockroach",
    options={
        "dsn": Option(check.url("postgresql", "postgres"), identity=True),
        "dialect": Option(check.choice("auto", "cockroach", "postgres"), "auto"),
        "schema": Option(check.identifier, "public", identity=True),
        "table": Option(check.identifier, "feature_values", identity=True),
        "timeout_ms": Option(check.positive(float), 2000.0),
        "connect_timeout_ms": Option(check.positive(float), 1000.0),
        "pool_size": Option(check.positive(int), 16),
        "cleanup_interval": Option(check.duration, 600.0),
    },
    open=CockroachBackend,
)
