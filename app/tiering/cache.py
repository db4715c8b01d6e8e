"""A read-through hot tier: a group's `cache` (a Redis backend) in front of its system of record (issue 14).

Reads: the cache first, for the cached groups of one system of record in one MGET, bounded by half of what is
left of the request's deadline (a slow cache must leave the system of record its time); the keys it lacks are
read from the system of record in the same request, in one more round trip together with that backend's other
groups, and queued for promotion. Promotions are written by a background task in batches, never on the
request's path, and dropped (counted) when the queue is full: a burst of misses costs the cache's warmth, not
the answer's latency. A promotion is a *copy*: it never replaces a cached row of the same event time or newer,
so a value read before a write can never replace what the write put there.

Writes: the system of record first, then the cache with the write rule (replacing a row of the same event time:
a correction). When the cache does not take a write (down, out of memory, its write circuit open), the write
still succeeds and its rows are held *dirty* in this worker: read from the system of record, never promoted,
and written to the cache again until it takes them (so a copy promoted from an older read cannot outlive them
there either). Past MAX_DIRTY_ROWS of a group, the group's cache is not read by this worker for its ttl, after
which every copy older than the failure has expired. Other workers learn nothing of it: when the cache refuses
writes but still answers reads, they may serve the older copy until this worker's retry lands or its ttl ends
(README, "Cache tier").

Failures: a cache that fails or is slow turns its keys into misses (the answer is not degraded) and counts
against the cache's circuit only; a system of record that fails leaves the cache's hits served and its misses
UNAVAILABLE (PartialRead, not answered). A read served wholly from the cache did not ask the system of record:
its circuit learns nothing from it.
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
    from app.resilience.breaker import Circuits
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation

log = logging.getLogger(__name__)

PROMOTION_QUEUE_ROWS = 50_000  # about 50k x 600 B of blobs waiting at most: 30 MB
PROMOTION_BATCH_ROWS = 1_000
MAX_DIRTY_ROWS = 100_000  # per group; past it, the group's cache is not read for its ttl
RETRY_S = 0.2


class CacheStore(Protocol):
    """What a backend offers to serve as a cache (backends/redis.py)."""

    async def put(self, group: Group, rows: Sequence[WriteRow], ttl_s: float, *, copy: bool = False) -> WriteResult:
        """Store rows unless the cached one is newer (`copy`: or of the same event time); each kept `ttl_s` at
        most (and never past its reclaim time)."""


@dataclass(slots=True)
class CacheRead:
    """How the cache part of one read went, for Server-Timing and spans."""

    backend: str
    ms: float = 0.0
    hits: int = 0
    misses: int = 0
    error: str | None = None


@dataclass(slots=True)
class Answer:
    """What `CacheTier.read` found: blobs per read, as `FeatureBackend.read` answers them."""

    blobs: list[list[bytes | None]]
    asked: bool  # was the system of record asked (and did it answer)?


class CacheTier:
    """This worker's promotions queue and dirty rows, and its cache counters (per group)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self._queue: list[tuple[Group, list[WriteRow]]] = []
        self._queued_rows = 0
        self._wake = asyncio.Event()
        # (group, key) -> the written row the cache has not taken yet: its cached copy may be older
        self.dirty: dict[tuple[str, str], WriteRow] = {}
        self._dirty_groups: dict[str, Group] = {}
        self._dirty_count: dict[str, int] = defaultdict(int)
        self.bypassed: dict[str, float] = {}  # group -> until when (monotonic) its cache is not read
        self._retrying = asyncio.Event()

    def count(self, group: str, event: str, n: int = 1) -> None:
        if n:
            self.gw.metrics.cache[(group, event)] += n

    def _bypassed(self, group: str) -> bool:
        until = self.bypassed.get(group)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self.bypassed[group]
        return False

    # -- reads ---------------------------------------------------------------------------------------

    async def read(
        self,
        generation: Generation,
        sor: FeatureBackend | None,
        reads: Sequence[tuple[Group, Sequence[str]]],
        deadline_at: float | None,
        limit_s: float | None,
        reports: list[CacheRead],
    ) -> Answer:
        """Cached groups from their cache, the rest and every miss from `sor` in one call (None: its circuit is
        open), under `deadline_at` and `sor`'s own `limit_s` from when it is asked. The caches are the request's
        `generation`'s. `reports` gets one entry per cache read.

        Raises PartialRead when the cache served some keys and `sor` failed (not answered) or answered only some
        (a Redis Cluster master down: answered); `sor`'s own error when the cache served none."""
        out: list[list[bytes | None]] = [[None] * len(keys) for _, keys in reads]
        by_cache: dict[str, list[int]] = defaultdict(list)
        for i, (group, keys) in enumerate(reads):
            if group.cache is None:
                continue
            if self._bypassed(group.name):
                self.count(group.name, "bypassed", len(keys))
            else:
                by_cache[group.cache.backend].append(i)
        if by_cache:
            await asyncio.gather(
                *(self._from_cache(generation, n, reads, ix, out, deadline_at, reports) for n, ix in by_cache.items())
            )
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
        if not asks:
            return Answer(out, asked=False)
        hits = sum(r.hits for r in reports)
        unasked: list[set[int]] = [set() for _ in reads]
        for i, positions in asks:
            unasked[i].update(positions)
        if sor is None:  # its circuit is open: the hits are served, the rest is UNAVAILABLE
            raise PartialRead(f"circuit open; {hits} value(s) served from the cache", out, unasked, answered=False)
        sor_reads = [(reads[i][0], [reads[i][1][j] for j in positions]) for i, positions in asks]
        partial: PartialRead | None = None
        try:
            # Its own timeout from now, not from the cache read's start; with hits, a little less than what is
            # left, so that the deadline does not cut the hits off with the misses
            async with asyncio.timeout(limit_s if not hits else _budget(deadline_at, limit_s)):
                blobs = await sor.read(sor_reads)
        except PartialRead as exc:  # a cluster master down: the rest of the misses were read
            blobs, partial = exc.blobs, exc
        except Exception as exc:
            if not hits:
                raise
            raise PartialRead(
                f"{describe_error(exc)}; {hits} value(s) served from the cache", out, unasked, answered=False
            ) from exc
        lost: list[set[int]] = [set() for _ in reads]
        for slot, ((i, positions), found) in enumerate(zip(asks, blobs, strict=True)):
            gone = partial.failed[slot] if partial is not None else set()
            served: list[tuple[str, bytes | None]] = []
            for n, (j, blob) in enumerate(zip(positions, found, strict=True)):
                if n in gone:
                    lost[i].add(j)
                else:
                    out[i][j] = blob
                    served.append((reads[i][1][j], blob))
            if i in cached:
                self._promote(reads[i][0], served)
        if partial is not None:
            raise PartialRead(str(partial), out, lost) from partial.__cause__
        return Answer(out, asked=True)

    async def _from_cache(
        self,
        generation: Generation,
        name: str,
        reads: Sequence[tuple[Group, Sequence[str]]],
        indexes: list[int],
        out: list[list[bytes | None]],
        deadline_at: float | None,
        reports: list[CacheRead],
    ) -> None:
        gw = self.gw
        report = CacheRead(name)
        reports.append(report)
        total = sum(len(reads[i][1]) for i in indexes)
        backend = generation.backends.get(name)
        breaker = generation.breakers[name].read if name in generation.breakers else None
        if backend is None or breaker is None or not breaker.allow():
            report.error, report.misses = "circuit open", total
            for i in indexes:
                self.count(reads[i][0].name, "bypassed", len(reads[i][1]))
            return
        started = time.perf_counter()
        # At most half of what is left of the deadline: a slow cache must leave the system of record its time
        budget = generation.read_timeout_s[name]
        if deadline_at is not None:
            budget = min(budget, max(deadline_at - started, 0.0) / 2)
        with gw.span(f"read cache {name}") as span:
            try:
                async with asyncio.timeout(budget):
                    blobs = await backend.read([reads[i] for i in indexes])
                breaker.success()
                gw.answered(name, "read")
            except asyncio.CancelledError:
                breaker.abandoned()  # a probe cut off proves nothing; a half-open circuit must not stay stuck
                raise
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
                return
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

    # -- promotions ----------------------------------------------------------------------------------

    def _promote(self, group: Group, found: Sequence[tuple[str, bytes | None]]) -> None:
        dirty = self.dirty
        rows = [
            WriteRow(k, blob_event_us(b), b)
            for k, b in found
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
                        if self._bypassed(group.name):
                            break  # its copies must all end with the bypass: none is added meanwhile
                        chunk = rows[start : start + PROMOTION_BATCH_ROWS]
                        chunk = [r for r in chunk if (group.name, r.key) not in self.dirty]
                        with self.gw.pinned() as generation:  # its cache is not closed by a reload meanwhile
                            await self._put(group, chunk, "promoted", generation.backends, generation.breakers)

    async def _put(
        self,
        group: Group,
        rows: list[WriteRow],
        event: str,
        backends: Mapping[str, FeatureBackend],
        breakers: Mapping[str, Circuits],
    ) -> bool:
        """Rows into the group's cache: a write (`written`) or a copy (`promoted`); False when it did not take
        them (failed, or its write circuit is open)."""
        assert group.cache is not None
        if not rows:
            return True
        name = group.cache.backend
        backend = backends.get(name)
        breaker = breakers[name].write if name in breakers else None
        if backend is None or breaker is None or not breaker.allow():
            self.count(group.name, f"{event}_failed", len(rows))
            return False
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.gw.limits.write_timeout_ms / 1000):
                result = await cast("CacheStore", backend).put(group, rows, group.cache.ttl_s, copy=event == "promoted")
        except asyncio.CancelledError:
            breaker.abandoned()
            raise
        except Exception as exc:
            if backend.server_answered(exc):
                breaker.abandoned()  # out of memory, read-only: it is up
            elif isinstance(exc, TimeoutError) and not self.gw.blames(name, "write", started):
                breaker.abandoned()
            else:
                breaker.failure()
            self.count(group.name, f"{event}_failed", len(rows))
            log.debug("cache %s did not take %d row(s) of %s: %s", name, len(rows), group.name, describe_error(exc))
            return False
        breaker.success()
        self.count(group.name, event, result.written)
        self.count(group.name, f"{event}_stale", result.skipped_stale)
        return True

    # -- writes --------------------------------------------------------------------------------------

    async def written(
        self,
        group: Group,
        rows: Sequence[WriteRow],
        backends: Mapping[str, FeatureBackend],
        breakers: Mapping[str, Circuits],
    ) -> None:
        """Rows just stored in the group's system of record: update their cached copies, or hold them dirty."""
        if self._bypassed(group.name):
            return  # not read until every copy older than the failure has ended
        if await self._put(group, list(rows), "written", backends, breakers):
            for row in rows:  # a dirty row this write supersedes is settled by it
                held = self.dirty.get((group.name, row.key))
                if held is not None and held.event_us <= row.event_us:
                    self._settle(group.name, row.key)
            return
        self._hold(group, rows)

    def _hold(self, group: Group, rows: Sequence[WriteRow]) -> None:
        self._dirty_groups[group.name] = group
        for row in rows:
            key = (group.name, row.key)
            held = self.dirty.get(key)
            if held is None:
                self._dirty_count[group.name] += 1
            if held is None or held.event_us <= row.event_us:
                self.dirty[key] = row
        if self._dirty_count[group.name] > MAX_DIRTY_ROWS:
            assert group.cache is not None
            # Too many to hold: the cache is not read for its ttl, by which time every older copy has ended
            self.bypassed[group.name] = time.monotonic() + group.cache.ttl_s
            for key in [k for k in self.dirty if k[0] == group.name]:
                self._settle(*key)
            log.warning(
                "the cache of %s refused more than %d written rows: not read by this worker for its ttl (%gs)",
                group.name,
                MAX_DIRTY_ROWS,
                group.cache.ttl_s,
            )
        self._retrying.set()

    def _settle(self, group: str, key: str) -> None:
        if self.dirty.pop((group, key), None) is not None:
            self._dirty_count[group] -= 1

    async def retry_dirty(self) -> None:
        """Write the dirty rows to their caches again, a chunk at a time, until each is taken; until cancelled."""
        while True:
            await self._retrying.wait()
            while self.dirty:
                by_group: dict[str, list[WriteRow]] = defaultdict(list)
                for (name, _), row in list(self.dirty.items()):
                    by_group[name].append(row)
                for name, rows in by_group.items():
                    group = self._dirty_groups[name]
                    for start in range(0, len(rows), PROMOTION_BATCH_ROWS):
                        chunk = rows[start : start + PROMOTION_BATCH_ROWS]
                        with self.gw.pinned() as generation:
                            taken = await self._put(group, chunk, "written", generation.backends, generation.breakers)
                        if not taken:
                            break
                        for row in chunk:  # unless written again meanwhile (then that row is held)
                            if self.dirty.get((name, row.key)) is row:
                                self._settle(name, row.key)
                        self.count(name, "settled", len(chunk))
                if self.dirty:
                    await asyncio.sleep(RETRY_S)
            self._retrying.clear()


def _budget(deadline_at: float | None, limit_s: float | None) -> float:
    """How long the misses' read may take when the cache served some keys: it ends before the request's deadline
    and the backend's own timeout (from now) cut the whole read off, so the hits are served anyway."""
    now = time.perf_counter()
    ends = [t for t in (deadline_at, None if limit_s is None else now + limit_s) if t is not None]
    if not ends:
        return 3600.0
    left = min(ends) - now
    return max(left - max(0.002, left * 0.05), 0.0)
