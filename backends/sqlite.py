"""Embedded SQLite: the zero-setup default, so the gateway serves with no servers at all.

Same row layout as the CockroachDB backend. sqlite3 blocks, so reads and writes each run on their own
single thread with their own connection (WAL mode lets them proceed side by side); the event loop never
waits on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from app.registry import BackendSpec, Group
from backends.base import WriteResult, WriteRow, expiry_us

T = TypeVar("T")
_CLEANUP_EVERY_US = 600 * 1_000_000

_DDL = (
    "CREATE TABLE IF NOT EXISTS feature_values (grp TEXT NOT NULL, entity_key TEXT NOT NULL, "
    "event_us INTEGER NOT NULL, expires_us INTEGER, payload BLOB NOT NULL, PRIMARY KEY (grp, entity_key)) "
    "WITHOUT ROWID"
)
_WRITE = (
    "INSERT INTO feature_values (grp, entity_key, event_us, expires_us, payload) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (grp, entity_key) DO UPDATE SET event_us = excluded.event_us, "
    "expires_us = excluded.expires_us, payload = excluded.payload WHERE feature_values.event_us <= excluded.event_us"
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

    def __init__(self, spec: BackendSpec, groups: Sequence[Group]):
        self.name = spec.name
        self.path = spec.options["path"]
        timeout_s = spec.options["timeout_ms"] / 1000
        self._reader = _Worker(self.path, timeout_s, f"sqlite-read-{spec.name}")
        self._writer = _Worker(self.path, timeout_s, f"sqlite-write-{spec.name}")
        self._cleaned_us = 0

    async def migrate(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await self._writer.run(lambda conn: conn.execute(_DDL))

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
        now_us = time.time_ns() // 1000
        params = [(group.name, r.key, r.event_us, expiry_us(group, r.event_us, now_us), r.blob) for r in rows]

        def write_all(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.executemany(_WRITE, params)
                written = conn.total_changes - before
                if now_us - self._cleaned_us > _CLEANUP_EVERY_US:
                    # Expired rows go with a write now and then: SQLite has no background job to do it.
                    conn.execute("DELETE FROM feature_values WHERE expires_us < ?", (now_us,))
                    self._cleaned_us = now_us
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return written

        written = await self._writer.run(write_all)
        return WriteResult(written, len(rows) - written)

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT count(*) FROM sqlite_master").fetchone())

    async def aclose(self) -> None:
        await self._reader.aclose()
        await self._writer.aclose()
