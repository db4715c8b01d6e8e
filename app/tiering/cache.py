"""A read-through hot tier: a group's `cache` (a Redis backend) in front of its system of record (issue 14).

Reads: the cache first, for the cached groups of one system of record in one MGET; the keys it lacks are read
from the system of record in the same request, in one more round trip together with that backend's other
groups, and queued for promotion. Promotions are written by a background task in batches, never on the
request's path, and dropped (counted) when the queue is full: a burst of misses costs the cache's warmth,
not the answer's latency.

Writes: the system of record first, then the cache with the same never-older rule (a promotion of a value
read before the write can then never replace it). When the cache does not take a write, the keys are held
as dirty in this worker: read from the system of record and never promoted until an eviction from the cache
succeeds, so no read here sees a value older than one written. Other workers learn nothing of it: when the
cache refuses writes but still answers reads, they may serve the older copy until the eviction lands or the
cache's ttl ends (README, "Cache tier").

Failures: a cache that fails or is slow turns its keys into misses (the answer is not degraded); a system
of record that fails leaves the cache's hits served and its misses UNAVAILABLE (PartialRead, not answered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from app.errors import describe_error
from app.registry.model import Group
from app.storage.layout import blob_event_us
from backends.base import FeatureBackend, PartialRead, WriteResult, WriteRow

if TYPE_CHECKING:
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation

log = logging.getLogger(__name__)

PROMOTION_QUEUE_ROWS = 50_000  # about 50k x 600 B of blobs waiting at most: 30 MB
PROMOTION_BATCH_ROWS = 1_000
MAX_DIRTY_KEYS = 1_000_000  # past it, the group's cache is bypassed until the evictions catch up
EVICT_RETRY_S = 0.2


class CacheStore(Protocol):
    """What a backend offers to serve as a cache (backends/redis.py)."""

    async def put(self, group: Group, rows: Sequence[WriteRow], ttl_s: float) -> WriteResult:
        """Store copies unless the cached one is newer; each kept `ttl_s` at most (and never past its
        reclaim time)."""

    async def evict(self, group: Group, keys: Sequence[str]) -> None:
        """Remove these keys' copies."""


@dataclass(slots=True)
class CacheRead:
    """How the cache part of one read went, for Server-Timing and spans."""

    backend: str
    ms: float = 0.0
    hits: int = 0
    misses: int = 0
    error: str | None = None


class CacheTier:
    """This worker's promotions queue and dirty keys, and its cache counters (per group)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self._queue: list[tuple[Group, list[WriteRow]]] = []
        self._queued_rows = 0
        self._wake = asyncio.Event()
        # (group, key) -> when it was marked (a sequence number): the cache may hold an older copy of it
        self.dirty: dict[tuple[str, str], int] = {}
        self._marks = 0
        self._dirty_groups: dict[str, Group] = {}
        self._dirty_count: dict[str, int] = defaultdict(int)
        self.bypassed: set[str] = set()  # groups with more dirty keys than MAX_DIRTY_KEYS
        self._evicting = asyncio.Event()

    # -- counters ------------------------------------------------------------------------------------

    def count(self, group: str, event: str, n: int = 1) -> None:
        self.gw.metrics.cache[(group, event)] += n

    # -- reads ---------------------------------------------------------------------------------------

    async def read(
        self,
        generation: Generation,
        sor: FeatureBackend | None,
        reads: Sequence[tuple[Group, Sequence[str]]],
        deadline_at: float | None,
    ) -> tuple[list[list[bytes | None]], list[CacheRead]]:
        """Blobs per read as `FeatureBackend.read` answers them: cached groups from their cache, the rest and
        every miss from `sor` in one call (None: its circuit is open). Raises PartialRead (not answered) when
        `sor` fails or is not asked while the cache served some keys; `sor`'s error when it served none.
        The caches are the request's `generation`'s (a reload meanwhile may have replaced them)."""
        out: list[list[bytes | None]] = [[None] * len(keys) for _, keys in reads]
        by_cache: dict[str, list[int]] = defaultdict(list)
        for i, (group, _) in enumerate(reads):
            if group.cache is not None and group.name not in self.bypassed:
                by_cache[group.cache.backend].append(i)
        reports = [await self._from_cache(generation, name, reads, indexes, out) for name, indexes in by_cache.items()]
        cached = {i for indexes in by_cache.values() for i in indexes}
        # What the system of record must answer: the uncached reads whole, the misses of the cached ones
        asks: list[tuple[int, list[int]]] = []  # (read index, positions in it)
        for i, (_, keys) in enumerate(reads):
            if i not in cached:
                asks.append((i, list(range(len(keys)))))
            else:
                missed = [j for j, blob in enumerate(out[i]) if blob is None]
                if missed:
                    asks.append((i, missed))
        hits = sum(r.hits for r in reports)
        if not asks:
            if sor is None:
                raise PartialRead("circuit open: served from the cache", out, [set() for _ in reads], answered=False)
            return out, reports
        try:
            if sor is None:
                raise _NotAsked
            sor_reads = [(reads[i][0], [reads[i][1][j] for j in positions]) for i, positions in asks]
            if deadline_at is None or not hits:
                blobs = await sor.read(sor_reads)
            else:  # the hits must not be lost with the misses when the system of record is slow
                async with asyncio.timeout(max(deadline_at - time.perf_counter() - _MARGIN_S, 0.0)):
                    blobs = await sor.read(sor_reads)
        except Exception as exc:
            if not hits:
                if isinstance(exc, _NotAsked):  # nothing to serve: the caller counts it as the open circuit
                    raise PartialRead("circuit open", out, [set(p) for _, p in asks], answered=False) from None
                raise
            failed: list[set[int]] = [set() for _ in reads]
            for i, positions in asks:
                failed[i].update(positions)
            why = "circuit open" if isinstance(exc, _NotAsked) else describe_error(exc)
            raise PartialRead(f"{why}; {hits} value(s) served from the cache", out, failed, answered=False) from (
                None if isinstance(exc, _NotAsked) else exc
            )
        for (i, positions), found in zip(asks, blobs, strict=True):
            group = reads[i][0]
            for j, blob in zip(positions, found, strict=True):
                out[i][j] = blob
            if i in cached:
                self._promote(group, [reads[i][1][j] for j in positions], found)
        return out, reports

    async def _from_cache(
        self,
        generation: Generation,
        name: str,
        reads: Sequence[tuple[Group, Sequence[str]]],
        indexes: list[int],
        out: list[list[bytes | None]],
    ) -> CacheRead:
        gw = self.gw
        report = CacheRead(name)
        total = sum(len(reads[i][1]) for i in indexes)
        backend = generation.backends.get(name)
        breaker = generation.breakers[name].read if name in generation.breakers else None
        if backend is None or breaker is None or not breaker.allow():
            report.error, report.misses = "circuit open", total
            for i in indexes:
                self.count(reads[i][0].name, "bypassed", len(reads[i][1]))
            return report
        started = time.perf_counter()
        with gw.span(f"read cache {name}") as span:
            try:
                async with asyncio.timeout(generation.read_timeout_s[name]):
                    blobs = await backend.read([reads[i] for i in indexes])
                breaker.success()
                gw.answered(name, "read")
            except Exception as exc:  # the cache failing is a miss of every key, not a degraded answer
                if backend.server_answered(exc):
                    breaker.abandoned()
                elif isinstance(exc, TimeoutError) and not gw.blames(name, "read", started):
                    breaker.abandoned()
                else:
                    breaker.failure()
                report.error = "timed out" if isinstance(exc, TimeoutError) else describe_error(exc)
                report.misses = total
                report.ms = (time.perf_counter() - started) * 1000
                for i in indexes:
                    self.count(reads[i][0].name, "error", len(reads[i][1]))
                span.record_exception(exc)
                return report
            report.ms = (time.perf_counter() - started) * 1000
            dirty = self.dirty
            for i, group_blobs in zip(indexes, blobs, strict=True):
                group, keys = reads[i]
                if dirty:
                    marked = {k for k in keys if (group.name, k) in dirty}
                    group_blobs = [None if k in marked else b for k, b in zip(keys, group_blobs, strict=True)]
                out[i] = group_blobs
                missed = group_blobs.count(None)
                report.hits += len(group_blobs) - missed
                report.misses += missed
                self.count(group.name, "hit", len(group_blobs) - missed)
                self.count(group.name, "miss", missed)
            if span.is_recording():
                span.set_attribute("backend.name", name)
                span.set_attribute("cache.hits", report.hits)
                span.set_attribute("cache.misses", report.misses)
        return report

    # -- promotions ----------------------------------------------------------------------------------

    def _promote(self, group: Group, keys: Sequence[str], blobs: Sequence[bytes | None]) -> None:
        dirty = self.dirty
        rows = [
            WriteRow(k, blob_event_us(b), b)
            for k, b in zip(keys, blobs, strict=True)
            if b is not None and not (dirty and (group.name, k) in dirty)
        ]
        if not rows:
            return
        if self._queued_rows + len(rows) > PROMOTION_QUEUE_ROWS:
            self.count(group.name, "promotion_dropped", len(rows))
            return
        self._queue.append((group, rows))
        self._queued_rows += len(rows)
        self._wake.set()

    async def run(self) -> None:
        """Write queued promotions to the caches, a batch per group at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue, self._queued_rows = self._queue, [], 0
                by_group: dict[str, tuple[Group, dict[str, WriteRow]]] = {}
                for group, rows in batch:
                    _, newest = by_group.setdefault(group.name, (group, {}))
                    for row in rows:
                        if row.key not in newest or newest[row.key].event_us <= row.event_us:
                            newest[row.key] = row
                for group, newest in by_group.values():
                    rows = list(newest.values())
                    for start in range(0, len(rows), PROMOTION_BATCH_ROWS):
                        with self.gw.pinned() as generation:  # its cache is not closed by a reload meanwhile
                            batch_rows = rows[start : start + PROMOTION_BATCH_ROWS]
                            await self._put(group, batch_rows, "promoted", generation.backends)

    async def _put(
        self, group: Group, rows: list[WriteRow], event: str, backends: Mapping[str, FeatureBackend]
    ) -> bool:
        """Copy rows into the group's cache (never older); False when it did not take them."""
        assert group.cache is not None
        name = group.cache.backend
        backend = backends.get(name)
        if backend is None:
            return False
        dirty = self.dirty
        if dirty and event == "promoted":
            rows = [r for r in rows if (group.name, r.key) not in dirty]
        try:
            async with asyncio.timeout(self.gw.limits.write_timeout_ms / 1000):
                result = await cast("CacheStore", backend).put(group, rows, group.cache.ttl_s)
        except Exception as exc:
            self.count(group.name, f"{event}_failed", len(rows))
            log.debug("cache %s did not take %d row(s) of %s: %s", name, len(rows), group.name, describe_error(exc))
            return False
        self.count(group.name, event, result.written)
        self.count(group.name, f"{event}_stale", result.skipped_stale)
        return True

    # -- writes --------------------------------------------------------------------------------------

    async def written(self, group: Group, rows: Sequence[WriteRow], backends: Mapping[str, FeatureBackend]) -> None:
        """Rows just stored in the group's system of record: update their cached copies, or hold them dirty."""
        if await self._put(group, list(rows), "written", backends):
            return
        self._dirty_groups[group.name] = group
        for row in rows:
            self._marks += 1
            if self.dirty.setdefault((group.name, row.key), self._marks) == self._marks:
                self._dirty_count[group.name] += 1
            else:
                self.dirty[(group.name, row.key)] = self._marks
        if self._dirty_count[group.name] > MAX_DIRTY_KEYS:
            self.bypassed.add(group.name)
        self._evicting.set()

    async def evict_dirty(self) -> None:
        """Retry evicting the dirty keys' copies until it succeeds, until cancelled."""
        while True:
            await self._evicting.wait()
            while self.dirty:
                by_group: dict[str, list[tuple[str, int]]] = defaultdict(list)
                for (name, key), mark in list(self.dirty.items()):
                    by_group[name].append((key, mark))
                for name, marked in by_group.items():
                    group = self._dirty_groups[name]
                    keys = [key for key, _ in marked]
                    assert group.cache is not None
                    try:
                        with self.gw.pinned() as generation:
                            backend = generation.backends.get(group.cache.backend)
                            if backend is not None:
                                async with asyncio.timeout(self.gw.limits.write_timeout_ms / 1000):
                                    await cast("CacheStore", backend).evict(group, keys)
                    except Exception as exc:
                        log.debug("evicting %d dirty key(s) of %s failed: %s", len(keys), name, describe_error(exc))
                        continue
                    for key, mark in marked:  # a key marked again meanwhile stays dirty
                        if self.dirty.get((name, key)) == mark:
                            del self.dirty[(name, key)]
                            self._dirty_count[name] -= 1
                    self.count(name, "evicted", len(keys))
                    if not self._dirty_count[name]:
                        self.bypassed.discard(name)
                if self.dirty:
                    await asyncio.sleep(EVICT_RETRY_S)
            self._evicting.clear()


class _NotAsked(Exception):
    """The system of record was not asked: its circuit is open."""


# The misses' read ends this much before the request's deadline, so that a slow system of record leaves the
# cache's hits served rather than the whole read cancelled by the deadline.
_MARGIN_S = 0.001
