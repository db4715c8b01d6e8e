"""Embedded SQLite: the zero-setup default, so the gateway serves with no servers at all.

Same row layout as the CockroachDB backend. sqlite3 blocks, so reads and writes each run on their own
single thread with their own connection (WAL mode lets them proceed side by side); the event loop never
waits on disk. Rows past their reclaim time are deleted on a timer (`cleanup_interval`), by the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")

_DDL = (
    "CREATE TABLE IF NOT EXISTS feature_values (grp TEXT NOT NULL, entity_key TEXT NOT NULL, "
    "event_us INTEGER NOT NULL, expires_us INTEGER, payload BLOB NOT NULL, PRIMARY KEY (grp, entity_key)) "
    "WITHOUT ROWID",
    # Streaming groups (backends/base.py TileStore): partial aggregates per tile, and the event ids seen
    "CREATE TABLE IF NOT EXISTS feature_tiles (grp TEXT NOT NULL, entity_key TEXT NOT NULL, tile_s INTEGER NOT NULL, "
    "tile_start INTEGER NOT NULL, expires_us INTEGER NOT NULL, partials BLOB NOT NULL, "
    "PRIMARY KEY (grp, entity_key, tile_s, tile_start)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS stream_events (grp TEXT NOT NULL, event_id TEXT NOT NULL, expires_us INTEGER NOT NULL, "
    "PRIMARY KEY (grp, event_id)) WITHOUT ROWID",
)
_CHUNK = 300  # event ids per statement: 3 parameters each, under SQLite's bound-parameter limit of 999
_UPSERT = (
    "INSERT INTO feature_values (grp, entity_key, event_us, expires_us, payload) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (grp, entity_key) DO UPDATE SET event_us = excluded.event_us, "
    "expires_us = excluded.expires_us, payload = excluded.payload "
    # A stored row past its reclaim time counts as absent, as on Redis, where its key is gone by then.
    "WHERE feature_values.event_us COMPARE excluded.event_us OR feature_values.expires_us < ?"
)
_WRITE = _UPSERT.replace("COMPARE", "<=")
_COPY = _UPSERT.replace("COMPARE", "<")  # a copy never replaces a row of the same event time
_RECLAIM = (
    "DELETE FROM feature_values WHERE (grp, entity_key) IN "
    "(SELECT grp, entity_key FROM feature_values WHERE expires_us < ?1 LIMIT ?2)",
    "DELETE FROM feature_tiles WHERE (grp, entity_key, tile_s, tile_start) IN "
    "(SELECT grp, entity_key, tile_s, tile_start FROM feature_tiles WHERE expires_us < ?1 LIMIT ?2)",
    "DELETE FROM stream_events WHERE (grp, event_id) IN "
    "(SELECT grp, event_id FROM stream_events WHERE expires_us < ?1 LIMIT ?2)",
)

# Per group: rows, and bytes of its text (as UTF-8) and blob columns plus 8 per integer column
_FOOTPRINT = tuple(
    f"SELECT count(*), coalesce(sum({' + '.join(columns)}), 0) FROM {table} WHERE grp = ?"
    for table, columns in (
        ("feature_values", ("length(CAST(grp AS BLOB))", "length(CAST(entity_key AS BLOB))", "16", "length(payload)")),
        ("feature_tiles", ("length(CAST(grp AS BLOB))", "length(CAST(entity_key AS BLOB))", "24", "length(partials)")),
        ("stream_events", ("length(CAST(grp AS BLOB))", "length(CAST(event_id AS BLOB))", "8")),
    )
)


class _Worker:
    """One thread owning one connection; calls run there in order."""

    def __init__(self, path: str, timeout_s: float, name: str):
        self.path = path
        self.timeout_s = timeout_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                try:
                    conn.execute("PRAGMA journal_mode=WAL")  # persists in the file: set once, by whoever is first
                except sqlite3.OperationalError:
                    pass  # another connection holds a lock while switching it; it stays WAL-able, only slower
            conn.execute("PRAGMA synchronous=NORMAL")
            self.local.conn = conn
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(self._conn()))

    def _close(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._close)
        self.executor.shutdown(wait=False)


class SqliteBackend:
    type = "sqlite"
    in_process = True

    def __init__(self, spec: BackendSpec, groups: Sequence[Group]):
        self.name = spec.name
        self.path = spec.options["path"]
        timeout_s = spec.options["timeout_ms"] / 1000
        self._reader = _Worker(self.path, timeout_s, f"sqlite-read-{spec.name}")
        self._writer = _Worker(self.path, timeout_s, f"sqlite-write-{spec.name}")
        self._cleanup_s: float = spec.options["cleanup_interval"]
        self._cleanup: asyncio.Task[None] | None = None

    def _start_cleanup(self) -> None:
        """The reclaim timer, from the first use on (no task may start before the event loop runs)."""
        if self._cleanup is None:
            self._cleanup = asyncio.get_running_loop().create_task(
                reclaim_loop(self.name, self._cleanup_s, self.delete_reclaimable), name=f"cleanup:{self.name}"
            )

    async def delete_reclaimable(self, limit: int) -> int:
        """Delete up to `limit` rows past their reclaim time, on the writer's thread; how many went."""
        now_us = time.time_ns() // 1000
        return await self._writer.run(lambda conn: sum(conn.execute(sql, (now_us, limit)).rowcount for sql in _RECLAIM))

    async def migrate(self) -> None:
        self._start_cleanup()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await self._writer.run(lambda conn: [conn.execute(ddl) for ddl in _DDL])

    async def read(self, reads: Sequence[tuple[Group, Sequence[str]]]) -> list[list[bytes | None]]:
        def read_all(conn: sqlite3.Connection) -> list[list[bytes | None]]:
            out = []
            for group, keys in reads:
                unique = list(dict.fromkeys(keys))
                found: dict[str, bytes] = {}
                for start in range(0, len(unique), 900):  # under SQLite's bound-parameter limit
                    chunk = unique[start : start + 900]
                    marks = ",".join("?" * len(chunk))
                    found.update(
                        conn.execute(
                            f"SELECT entity_key, payload FROM feature_values WHERE grp = ? AND entity_key IN ({marks})",
                            [group.name, *chunk],
                        ).fetchall()
                    )
                out.append([found.get(k) for k in keys])
            return out

        return await self._reader.run(read_all)

    async def write(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        return await self._upsert(_WRITE, group, rows)

    async def copy(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        return await self._upsert(_COPY, group, rows)

    async def _upsert(self, sql: str, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        self._start_cleanup()
        now_us = time.time_ns() // 1000
        params = [(group.name, r.key, r.event_us, reclaim_us(group, r.event_us), r.blob, now_us) for r in rows]

        def write_all(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.executemany(sql, params)
                written = conn.total_changes - before
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return written

        written = await self._writer.run(write_all)
        return WriteResult(written, len(rows) - written)

    async def scan(self, group: Group, cursor: str | None, limit: int) -> Scanned:
        def page(conn: sqlite3.Connection) -> list[WriteRow]:
            found = conn.execute(
                "SELECT entity_key, event_us, payload FROM feature_values WHERE grp = ? AND entity_key > ? "
                "ORDER BY entity_key LIMIT ?",
                (group.name, cursor or "", limit),
            ).fetchall()
            return [WriteRow(*row) for row in found]

        rows = await self._reader.run(page)
        return Scanned(rows, rows[-1].key if len(rows) == limit else None)

    async def delete(self, group: Group, keys: Sequence[str]) -> None:
        def delete_all(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(keys), 900):  # under SQLite's bound-parameter limit
                    chunk = list(keys[start : start + 900])
                    marks = ",".join("?" * len(chunk))
                    sql = f"DELETE FROM feature_values WHERE grp = ? AND entity_key IN ({marks})"
                    conn.execute(sql, [group.name, *chunk])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._writer.run(delete_all)

    async def apply(
        self,
        group: str,
        events: Mapping[str, str],
        tiles: Sequence[TileRef],
        fold: Fold,
        keep_us: int,
        tile_keep_us: Mapping[int, int],
    ) -> int:
        """TileStore.apply: one IMMEDIATE transaction, which SQLite runs one at a time."""
        self._start_cleanup()
        event_ids = list(events)
        now_us = time.time_ns() // 1000

        def apply_all(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                new: set[str] = set()
                for start in range(0, len(event_ids), _CHUNK):
                    chunk = event_ids[start : start + _CHUNK]
                    values = ",".join("(?, ?, ?)" for _ in chunk)
                    params = [p for event_id in chunk for p in (group, event_id, now_us + keep_us)]
                    sql = f"INSERT INTO stream_events VALUES {values} ON CONFLICT DO NOTHING RETURNING event_id"
                    new.update(row[0] for row in conn.execute(sql, params).fetchall())
                written = fold(new, _stored_tiles(conn, group, tiles)) if new else {}
                conn.executemany(
                    "INSERT OR REPLACE INTO feature_tiles VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (group, e, size, at, at + size * 1_000_000 + tile_keep_us[size], blob)
                        for (e, size, at), blob in written.items()
                    ],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return len(new)

        return await self._writer.run(apply_all)

    async def read_tiles(
        self, group: str, entities: Sequence[str], needed: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        tiles = [(entity, size, start) for entity in entities for size, start in needed]
        found = await self._reader.run(lambda conn: _stored_tiles(conn, group, tiles))
        return [found.get(t) for t in tiles]

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT count(*) FROM sqlite_master").fetchone())

    def server_answered(self, exc: BaseException) -> bool:
        return False  # in-process: no server to tell apart from its answers (a locked file counts against it)

    async def aclose(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup
        await self._reader.aclose()
        await self._writer.aclose()

    async def footprints(self, groups: Sequence[Group], budget_s: float) -> dict[str, Footprint]:
        """Measured (backends/base.py), exactly: per group its rows, and per row the bytes of its text (UTF-8)
        and blob columns plus 8 per integer column (the key, event time, expiry and the blob; for an aggregation
        group also its tiles' and event ids' rows). Not counted: SQLite's record headers, the b-tree pages'
        free space, the WAL. On a thread and connection of its own (read-only), so that serving reads do not
        queue behind it; SQLite interrupts it at `budget_s`."""
        path = self.path

        def measure() -> dict[str, Footprint]:
            deadline = time.monotonic() + budget_s
            uri = Path(path).absolute().as_uri() + "?mode=ro"  # read-only: a missing file is an error, not created
            conn = sqlite3.connect(uri, uri=True, timeout=budget_s, check_same_thread=False)
            try:
                conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
                out = {}
                for group in groups:
                    keys, size = 0, 0
                    for sql in _FOOTPRINT[: 3 if group.streaming else 1]:
                        rows, total = conn.execute(sql, (group.name,)).fetchone()
                        keys, size = keys + rows, size + total
                    out[group.name] = Footprint(keys, size, False)
                return out
            finally:
                conn.close()

        return await asyncio.to_thread(measure)


def _stored_tiles(conn: sqlite3.Connection, group: str, tiles: Sequence[TileRef]) -> dict[TileRef, bytes]:
    """The stored blobs of `tiles`, read as one primary-key range per (entity, tile size)."""
    wanted = set(tiles)
    found: dict[TileRef, bytes] = {}
    sql = (
        "SELECT tile_start, partials FROM feature_tiles "
        "WHERE grp = ? AND entity_key = ? AND tile_s = ? AND tile_start BETWEEN ? AND ?"
    )
    for (entity, size), (lo, hi) in tile_spans(tiles).items():
        for start, blob in conn.execute(sql, (group, entity, size, lo, hi)).fetchall():
            if (entity, size, start) in wanted:
                found[(entity, size, start)] = blob
    return found


KIND = BackendKind(
    type="sqlite",
    options={
        "path": Option(check.file_path, identity=True),
        "timeout_ms": Option(check.positive(float), 1000.0),
        "cleanup_interval": Option(check.duration, 600.0),
    },
    open=SqliteBackend,
)
