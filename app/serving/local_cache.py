"""A per-worker cache of stored blobs in front of a group's backend (opt-in per group: `local_cache_ms`).

Why: a Zipf-shaped load asks the same few entities over and over; each ask costs a backend round trip (an MGET, a
SQL statement) although the value has not changed. Served from this process's memory for at most
`local_cache_ms`, a hot key costs a dict lookup.

What is kept: the raw stored blob per (group, entity key), or None for a key the backend did not have. Every plan
of the group shares it, and `GroupPlan.cell` still decodes it at the request's own `now_us`: statuses, defaults,
ttl expiry and a service's max_age are judged per request, exactly as for a blob just read. An entry is served
for at most `local_cache_ms` after the backend read that produced it *started* (a slow read does not lengthen it).

Bounded by entries and bytes (GATEWAY_LOCAL_CACHE_ENTRIES, GATEWAY_LOCAL_CACHE_BYTES) per worker, evicted in the
order they were filled (FIFO: a hot key is refilled every `local_cache_ms` anyway, so it stays near the young
end; no reordering on a hit).

Single flight: a key this worker is reading from the backend right now is not read again by a second request; it
waits for the first read (bounded by its own deadline). A waiter whose leader failed or was cut off by its own
deadline reads the key itself, so it sees what its own read would have: a failure of someone else's read is never
served as its own.

Invalidation across the workers of this gateway (`serve --workers N` runs separate processes): a shared file of
SLOTS 8-byte stamps (mmap; in the directory the workers already share for metrics, else anonymous memory), slot =
crc32(group, key) % SLOTS (a stable hash: `hash()` is seeded per process). A write through this gateway stores
time.monotonic_ns() (one clock for every process of the host) into the slots of its keys *after* the backend has
confirmed it (and after the cache tier took it). A read notes the slot's stamp *before* it asks the backend and
keeps it with the entry; an entry is served only while its slot still holds that stamp, and a read in flight is
joined only while it does. So a write that returned before a fetch started is always seen by it, on every worker;
a slot shared by two keys only costs the other key a miss. Writes not through this gateway (another gateway,
materialize, a stream consumer, a Spark job) are seen once the entry's `local_cache_ms` has run out.

Measured (bench/local_cache.py and `serve()` in a loop, a loaded 2-core box, Python 3.11): a request of 2 groups
x 1 key all held costs 1.4 us in `held` (the fetch's path when every key of a backend is held: no task, no
backend), 2 x 100 keys 35 us (0.18 us a key, stamp check included); a 1-key miss about 10 us more than the
backend's read itself (lookup, stamp, read in flight, entry); a written key's stamp 0.3 us. `serve()` of 1 entity
x 100 features over Redis and PostgreSQL: 41 us of CPU all held, 216 us all missed against 188 us without the
cache. Through HTTP (bench/main.py's Zipf rows, 1 worker, 32 connections, s = 1.1 over 100,000 entities,
local_cache_ms 1000): about 60% of keys held, 2,494 -> 2,993 requests/s, the answer's HTTP and JSON work (about
0.16 ms of CPU a request) being what is left once the reads are gone. A group without `local_cache_ms` pays one
attribute test per request. An entry's Python objects take about 100 bytes beside its blob and key
(tracemalloc); it is accounted as blob + key + ENTRY_OVERHEAD_BYTES.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from app.errors import describe_error
from backends.base import FeatureBackend, PartialRead

if TYPE_CHECKING:
    from app.registry.model import Group
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation
    from app.serving.statuses import BackendOutcome

log = logging.getLogger(__name__)

SLOTS = 65_536  # 512 KiB of stamps: two keys of 100,000 written between two reads share a slot rarely
STAMPS_FILE = "local-cache-stamps"
# The entry's tuple, its key's tuple, the ordered dict's slot and link: ~100 B measured with tracemalloc (see
# bench/local_cache.py), plus the key's str object (~50 B); counted generously
ENTRY_OVERHEAD_BYTES = 200

Blobs = list[list[bytes | None]]
Reads = Sequence[tuple["Group", Sequence[str]]]
# (blob or None: known missing, read started at (monotonic s), stamp slot, stamp seen before the read, bytes)
Entry = tuple[bytes | None, float, int, int, int]


class Stamps:
    """The invalidation stamps every worker of this gateway shares (see the module's text)."""

    def __init__(self, directory: str | None = None, slots: int = SLOTS):
        assert slots & (slots - 1) == 0, "a power of two"
        self.mask = slots - 1
        size = slots * 8
        if directory is None:
            self._map = mmap.mmap(-1, size)
        else:
            try:
                fd = os.open(Path(directory) / STAMPS_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.warning(
                    "cannot share the local cache's invalidation stamps in %s (%s): a write through another worker "
                    "is seen by this one only once its copies end (local_cache_ms)",
                    directory,
                    exc,
                )
                fd = -1
            if fd < 0:
                self._map = mmap.mmap(-1, size)
            else:
                try:
                    if os.fstat(fd).st_size < size:  # the first worker to start; growing it again is harmless
                        os.ftruncate(fd, size)
                    self._map = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
        self.view = memoryview(self._map).cast("q")
        self._seeds: dict[str, int] = {}

    def slot(self, group: str, key: str) -> int:
        seed = self._seeds.get(group)
        if seed is None:
            seed = self._seeds[group] = zlib.crc32(group.encode() + b"\x00")
        return zlib.crc32(key.encode(), seed) & self.mask

    def bump(self, group: str, keys: Sequence[str]) -> None:
        """Keys of `group` just written: every entry and read in flight that noted their slots' stamps ends."""
        view = self.view
        now = time.monotonic_ns()
        for key in keys:
            i = self.slot(group, key)
            old = view[i]
            view[i] = now if now > old else old + 1  # never the value a reader noted before

    def close(self) -> None:
        self.view.release()
        self._map.close()


class _Flight:
    """One request's backend read of some keys of one group, which other requests of this worker may wait for."""

    __slots__ = ("blobs", "done", "failed", "over", "started")

    def __init__(self, started: float) -> None:
        self.started = started  # time.monotonic() before the backend was asked
        self.over = False  # answered, failed or cut off
        self.done: asyncio.Future[None] | None = None  # made by the first request that waits for it
        self.blobs: list[bytes | None] | None = None  # per position of the read, once it answered
        self.failed: set[int] = set()  # positions it could not read


# (the flight, position in it, stamp slot, stamp noted before the read)
_Joinable = tuple[_Flight, int, int, int]


class LocalCache:
    """This worker's entries, its reads in flight and its counters."""

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 64 * 1024 * 1024, directory: str | None = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stamps = Stamps(directory)
        self.entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self.bytes = 0
        self._flights: dict[tuple[str, str], _Joinable] = {}
        self.epoch = 0  # a reload clears the entries; a read begun before it fills nothing
        # (group, "hit" | "miss" | "coalesced") -> keys; Metrics reads it (Gateway wires it)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)

    def size(self) -> dict[str, float]:
        return {"entries": len(self.entries), "bytes": self.bytes}

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self.epoch += 1

    def written(self, group: str, keys: Sequence[str]) -> None:
        """Keys of `group` written through this gateway: no worker serves what it held of them any more."""
        self.stamps.bump(group, keys)

    def close(self) -> None:
        self.clear()
        self.stamps.close()

    def _put(self, gk: tuple[str, str], blob: bytes | None, started: float, slot: int, stamp: int) -> None:
        size = (0 if blob is None else len(blob)) + len(gk[1]) + ENTRY_OVERHEAD_BYTES
        entries = self.entries
        old = entries.pop(gk, None)
        if old is not None:
            self.bytes -= old[4]
        entries[gk] = (blob, started, slot, stamp, size)
        self.bytes += size
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = entries.popitem(last=False)
            self.bytes -= evicted[4]

    def held(self, reads: Reads) -> Blobs | None:
        """Every key's blob when this worker holds them all (counted as hits), else None (nothing counted): a
        request served wholly from memory needs no task, no backend and no waiting. Every group must have
        `local_cache_ms`."""
        now = time.monotonic()
        view, entries = self.stamps.view, self.entries
        out: Blobs = []
        for group, keys in reads:
            name, ttl_s = group.name, cast(float, group.local_cache_ms) / 1000
            row: list[bytes | None] = []
            for key in keys:
                entry = entries.get((name, key))
                if entry is None or now - entry[1] >= ttl_s or view[entry[2]] != entry[3]:
                    return None
                row.append(entry[0])
            out.append(row)
        counts = self.counts
        for group, keys in reads:
            counts[(group.name, "hit")] += len(keys)
        return out

    def lookup(self, reads: Reads, out: Blobs) -> tuple[list[_Ask], list[_Wait], int]:
        """Fill `out` with what is held; the rest: what to ask the backend (groups without `local_cache_ms` whole,
        the misses of the others), the keys to wait for (being read by another request of this worker), and how
        many keys were held."""
        asks: list[_Ask] = []
        waits: list[_Wait] = []
        now = time.monotonic()
        view = self.stamps.view
        entries, flights, counts = self.entries, self._flights, self.counts
        held = 0
        for i, (group, keys) in enumerate(reads):
            ms = group.local_cache_ms
            if ms is None:
                asks.append((i, list(range(len(keys)))))
                continue
            name, ttl_s = group.name, ms / 1000
            missed: list[int] = []
            row = out[i]
            coalesced = 0
            for j, key in enumerate(keys):
                gk = (name, key)
                entry = entries.get(gk)
                if entry is not None and now - entry[1] < ttl_s and view[entry[2]] == entry[3]:
                    row[j] = entry[0]
                    continue
                joinable = flights.get(gk)
                if joinable is not None and view[joinable[2]] == joinable[3] and now - joinable[0].started < ttl_s:
                    waits.append((i, j, joinable[0], joinable[1]))
                    coalesced += 1
                    continue
                missed.append(j)
            hits = len(keys) - len(missed) - coalesced
            held += hits
            if hits:
                counts[(name, "hit")] += hits
            if coalesced:
                counts[(name, "coalesced")] += coalesced
            if missed:
                counts[(name, "miss")] += len(missed)
                asks.append((i, missed))
        return asks, waits, held

    def lead(self, reads: Reads, asks: list[_Ask]) -> _Round:
        """The backend read of `asks` about to be issued: each cached group's keys become a read in flight that
        other requests may join, with the stamps of their slots noted now, before the backend is asked."""
        started = time.monotonic()
        view, slot_of, flights = self.stamps.view, self.stamps.slot, self._flights
        sub: list[tuple[Group, list[str]]] = []
        led: list[tuple[_Flight, int, list[tuple[tuple[str, str], int, int]]]] = []
        for n, (i, positions) in enumerate(asks):
            group, keys = reads[i]
            picked = [keys[j] for j in positions]
            sub.append((group, picked))
            if group.local_cache_ms is None:
                continue
            flight = _Flight(started)
            name = group.name
            noted = []
            for m, key in enumerate(picked):
                gk = (name, key)
                slot = slot_of(name, key)
                stamp = view[slot]
                flights[gk] = (flight, m, slot, stamp)
                noted.append((gk, slot, stamp))
            led.append((flight, n, noted))
        return _Round(asks, sub, led, started, self.epoch)

    def settle(
        self, rnd: _Round, out: Blobs, failed: list[set[int]], answered: Blobs, lost: list[set[int]] | None
    ) -> None:
        """The backend answered `rnd` (`lost`: per ask, the positions it could not read): into `out` and
        `failed`, into the entries (unless a reload emptied them meanwhile), and to the requests waiting."""
        for n, ((i, positions), blobs) in enumerate(zip(rnd.asks, answered, strict=True)):
            row = out[i]
            gone = lost[n] if lost is not None else None
            for m, (j, blob) in enumerate(zip(positions, blobs, strict=True)):
                if gone and m in gone:
                    failed[i].add(j)
                else:
                    row[j] = blob
        fill = self.epoch == rnd.epoch
        for flight, n, noted in rnd.led:
            blobs = answered[n]
            gone = lost[n] if lost is not None else set()
            flight.blobs, flight.failed = blobs, gone
            if fill:
                for m, (gk, slot, stamp) in enumerate(noted):
                    if m not in gone:
                        self._put(gk, blobs[m], rnd.started, slot, stamp)

    def release(self, rnd: _Round) -> None:
        """`rnd` is over (answered, failed or cut off): its keys are no longer in flight, and whoever waits for
        them goes on (reading them itself when there is no answer)."""
        flights = self._flights
        for flight, _, noted in rnd.led:
            if flight.blobs is None:
                flight.failed = set(range(len(noted)))
            for gk, _, _ in noted:
                joinable = flights.get(gk)
                if joinable is not None and joinable[0] is flight:
                    del flights[gk]
            flight.over = True
            if flight.done is not None:
                flight.done.set_result(None)

    async def wait(
        self, waits: list[_Wait], out: Blobs, failed: list[set[int]], served: bool, deadline_at: float | None
    ) -> tuple[list[tuple[int, int]], int, BaseException | None]:
        """Wait for the reads in flight this request joined: at most until just before its deadline when it has
        something to serve (those still unread are then UNAVAILABLE), else until the deadline cuts it off as it
        would cut its own read. Returns the keys whose leader failed (to be read by this request), how many keys
        the leaders served, and why some are left unread."""
        pending: set[asyncio.Future[None]] = set()
        for _, _, flight, _ in waits:
            if not flight.over:
                if flight.done is None:
                    flight.done = asyncio.get_running_loop().create_future()
                pending.add(flight.done)
        error: BaseException | None = None
        if pending:
            await asyncio.wait(pending, timeout=_budget(deadline_at) if served else None)
        retry: list[tuple[int, int]] = []
        served_keys = 0
        for i, j, flight, m in waits:
            if not flight.over:
                failed[i].add(j)
                error = error or TimeoutError("another request's read of the same keys did not answer in time")
            elif flight.blobs is None or m in flight.failed:
                retry.append((i, j))
            else:
                out[i][j] = flight.blobs[m]
                served_keys += 1
        return retry, served_keys, error


_Ask = tuple[int, list[int]]  # (read index, positions in it) to ask the backend
_Wait = tuple[int, int, _Flight, int]  # (read index, position, the read in flight, position in it)


class _Round:
    """One backend read issued for a request: what it asks, and the reads in flight it leads."""

    __slots__ = ("asks", "epoch", "led", "started", "sub")

    def __init__(
        self,
        asks: list[_Ask],
        sub: list[tuple[Group, list[str]]],
        led: list[tuple[_Flight, int, list[tuple[tuple[str, str], int, int]]]],
        started: float,
        epoch: int,
    ):
        self.asks, self.sub, self.led, self.started, self.epoch = asks, sub, led, started, epoch


def _budget(deadline_at: float | None, limit_s: float | None = None) -> float | None:
    """How long a read may take when some keys are served already: it ends a little before the request's deadline
    (and the backend's own timeout, from now), so that the deadline does not cut off what was served with it."""
    now = time.perf_counter()
    ends = [t for t in (deadline_at, None if limit_s is None else now + limit_s) if t is not None]
    if not ends:
        return None
    left = min(ends) - now
    return max(left - max(0.002, left * 0.05), 0.0)


async def read_through(
    gw: Gateway,
    generation: Generation,
    backend: FeatureBackend | None,
    reads: Reads,
    deadline_at: float | None,
    limit_s: float | None,
    outcome: BackendOutcome,
) -> Blobs:
    """The stored groups of one backend's read (app/serving/fetch.py) when some have `local_cache_ms`: blobs per
    read, as FeatureBackend.read answers them. What this worker holds is served; keys another request of the
    worker is reading are waited for; the rest is read as without the cache, in one call (the backend, through
    the groups' cache tier when they have one), under the backend's own timeout `limit_s` from when it is asked.
    `backend` None: its circuit is open, only the caches answer.

    Raises PartialRead when some keys could not be read but others were served (from memory or by another
    request's read), the backend's own error when nothing was. One coroutine: the miss path is as deep as
    a read without the cache, plus this frame."""
    cache = gw.local_cache
    out: Blobs = [[None] * len(keys) for _, keys in reads]
    failed: list[set[int]] = [set() for _ in reads]
    asks, waits, served = cache.lookup(reads, out)  # served: held keys, then > 0 when anything was served
    missed = 0
    for i, positions in asks:
        if reads[i][0].local_cache_ms:
            missed += len(positions)
    outcome.local = (served, len(waits), missed)
    tiered = False  # (a loop, not any(): this runs per backend per request)
    for group, _ in reads:
        if group.cache is not None:
            tiered = True
    asked = False
    error: BaseException | None = None  # the first failure that left keys unread
    for attempt in (0, 1):  # a second round reads the keys whose leader failed, as this request's own read
        if asks:
            rnd = cache.lead(reads, asks)
            sub = rnd.sub
            lost: list[set[int]] | None = None
            try:
                try:
                    if backend is None or tiered:
                        if backend is None and not tiered:
                            every = [set(range(len(k))) for _, k in sub]
                            raise PartialRead("circuit open", [[None] * len(k) for _, k in sub], every, answered=False)
                        if outcome.cache is None:
                            outcome.cache = []
                        tier = gw.cache.read(generation, backend, sub, deadline_at, limit_s, outcome.cache)
                        async with asyncio.timeout(_budget(deadline_at) if served else None):
                            answer = await tier
                        answered, asked = answer.blobs, asked or answer.asked
                    else:
                        limit = _budget(deadline_at, limit_s) if served else limit_s
                        if limit is None:
                            answered = await backend.read(sub)
                        else:
                            async with asyncio.timeout(limit):
                                answered = await backend.read(sub)
                        asked = True
                except PartialRead as exc:
                    answered, lost, asked, error = exc.blobs, exc.failed, asked or exc.answered, error or exc
                except Exception as exc:
                    if not served:
                        raise
                    lost = [set(range(len(k))) for _, k in sub]
                    answered, error = [[None] * len(k) for _, k in sub], error or exc
                cache.settle(rnd, out, failed, answered, lost)
            finally:
                cache.release(rnd)
            if lost is None or sum(map(len, lost)) < sum(len(p) for _, p in asks):
                served += 1  # (whether something was served is what counts from here on)
        if attempt or not waits:
            break
        retry, waited, waited_error = await cache.wait(waits, out, failed, served > 0 or asked, deadline_at)
        served += waited
        error = error or waited_error
        if not retry:
            break
        by_read: dict[int, list[int]] = defaultdict(list)
        for i, j in retry:
            by_read[i].append(j)
        asks = list(by_read.items())
    if any(failed):
        assert error is not None
        if isinstance(error, PartialRead):
            raise PartialRead(str(error), out, failed, answered=error.answered) from error.__cause__
        raise PartialRead(
            f"{describe_error(error)}; the other values were served from this worker's cache or another request's read",
            out,
            failed,
            answered=False,
        ) from error
    outcome.asked = asked
    return out
