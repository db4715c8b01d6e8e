"""The one extension point for storage: a `FeatureBackend` moves blobs (see `app/storage/layout.py`) for groups.

The core passes a backend only its own groups, keys already deduplicated, and a deadline it enforces by
cancelling the call; a backend raises on failure and never retries past its own short timeouts. Each backend
module also declares a `BackendKind`: its option schema, which options say where its data lives, and how to
open it; `backends/__init__.py` registers it (see backends/README.md). This module imports no driver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from app.registry.model import BackendSpec, Group


class WriteRow(NamedTuple):
    key: str  # canonical entity key (`str(id)` for int64 entities)
    event_us: int  # event time, microseconds since the epoch
    blob: bytes  # the encoded values, event time in its header


class WriteResult(NamedTuple):
    written: int
    skipped_stale: int  # rows whose stored event time was newer; nothing was changed for them


TileRef = tuple[str, int, int]  # entity key, tile size (s), tile start (us): one tile of an aggregation group
# What a store runs inside its transaction (app/streams/tiles.py `fold`): given the batch's event ids not seen
# before and the stored blobs of the tiles the batch touches, the blobs to write.
Fold = Callable[[set[str], Mapping[TileRef, bytes]], Mapping[TileRef, bytes]]


def tile_spans(tiles: Sequence[TileRef]) -> dict[tuple[str, int], tuple[int, int]]:
    """The asked tiles as one start range per (entity, tile size): a window's tiles are consecutive, so a SQL
    store reads them as a range of its primary key rather than as hundreds of single keys."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for entity, size, start in tiles:
        lo, hi = spans.get((entity, size), (start, start))
        spans[(entity, size)] = (min(lo, start), max(hi, start))
    return spans


class TileStore(Protocol):
    """Partial aggregates in time tiles for the streaming groups (issue 13), next to `FeatureBackend`'s blobs.

    `apply` is atomic and idempotent: in one transaction it records which of the batch's event ids it has not
    seen (kept `keep_us`), reads the touched tiles, folds the new events in and writes them, so a batch sent
    twice, or two consumers sending overlapping batches at once, count each event once. `events` maps each event
    id of the batch to its entity's key. A tile of size s is kept `tile_keep_us[s]` past its end (its windows'
    longest plus the lateness). It answers how many events were new.

    Atomic per entity at least: an entity's new ids are recorded together with its tiles, or neither is. The SQL
    stores write a whole batch or nothing; Redis commits entity by entity (a batch that fails half-way has
    stored some entities' events, which a resend then counts once).
    """

    async def apply(
        self,
        group: str,
        events: Mapping[str, str],
        tiles: Sequence[TileRef],
        fold: Fold,
        keep_us: int,
        tile_keep_us: Mapping[int, int],
    ) -> int: ...

    async def read_tiles(
        self, group: str, entities: Sequence[str], tiles: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        """The same tiles ((size, start)) of every entity: blobs entity by entity, None where there is none."""


class Scanned(NamedTuple):
    rows: list[WriteRow]
    cursor: str | None  # where the next page starts; None: the scan is complete


class Movable(Protocol):
    """What `feature-gateway move` needs of a backend (app/tiering/move.py): every row of a group, a page at a
    time, resumable from a cursor, and deleting rows by key."""

    async def scan(self, group: Group, cursor: str | None, limit: int) -> Scanned:
        """About `limit` rows of the group from `cursor` (None: the start). A row present during the whole scan
        is returned at least once (Redis' SCAN may return one twice); rows written meanwhile may or may not be."""

    async def copy(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        """`FeatureBackend.write`, except that a stored row of the same event time is kept: a copy read earlier
        must not replace a correction written since under the same event time."""

    async def delete(self, group: Group, keys: Sequence[str]) -> None:
        """Remove these rows of the group."""


class PartialRead(Exception):
    """A read that failed for some keys only (a Redis Cluster master that is down while the others answer).

    `blobs` is what `read` would have returned, with None for the keys that failed; `failed` holds, per group
    of the read, the positions of those keys. The serving core serves every other key as read and the failed
    ones UNAVAILABLE; the cause is chained (`raise PartialRead(...) from exc`). A read that got nothing raises
    its error instead, so that it counts as the backend's failure.

    `answered` False: the backend itself failed (or was not asked, its circuit open: no cause) and the keys
    served came from elsewhere (a group's cache, app/tiering/cache.py); the failure counts against it.
    """

    def __init__(self, message: str, blobs: list[list[bytes | None]], failed: list[set[int]], *, answered: bool = True):
        super().__init__(message)
        self.blobs = blobs
        self.failed = failed
        self.answered = answered


class FeatureBackend(Protocol):
    name: str
    type: str
    # Runs inside the gateway's process (a thread): a read cut off by the deadline is then the CPU's doing,
    # never an outage, and opens no circuit (see Gateway.blames).
    in_process: bool

    async def migrate(self) -> None:
        """Create what the backend needs (tables, indexes); idempotent, safe to run at every start."""

    async def read(self, reads: Sequence[tuple[Group, Sequence[str]]]) -> list[list[bytes | None]]:
        """For each (group, keys): the stored blob per key, None where absent. One round trip where possible.

        Raises on failure; `PartialRead` when only some keys could not be read (the rest are served)."""

    async def write(self, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
        """Store rows (distinct keys) atomically; never replace a blob whose event time is newer.

        Redis Cluster can only be atomic per slot (see backends/redis_cluster.py)."""

    async def ping(self) -> None:
        """Raise unless the backend answers."""

    async def aclose(self) -> None:
        """Release connections; the backend is not used afterwards."""

    def server_answered(self, exc: BaseException) -> bool:
        """Did the server itself refuse this one operation (so it is up)? Then the failure is no reason to open
        the backend's circuit: an error of this request (a full Redis, a read-only replica, a constraint), not
        an outage. Connection errors and timeouts are not answers."""


REQUIRED: Any = ...  # the default of an option that must be given


@dataclass(frozen=True, slots=True)
class Option:
    """One backend option: its check (YAML value -> value, ValueError with a reason) and default."""

    check: Callable[[Any], Any]
    default: Any = REQUIRED
    identity: bool = False  # says where the data lives: a materialize checkpoint is bound to it


@dataclass(frozen=True, slots=True)
class BackendKind:
    """What the registry and the composition root need of one backend type."""

    type: str
    options: Mapping[str, Option]
    open: Callable[[BackendSpec, Sequence[Group]], FeatureBackend]  # lazily: a backend that is down starts too
    rules: Callable[[Mapping[str, Any]], tuple[str, str] | None] | None = None  # options together: (option, why)

    @property
    def identity(self) -> tuple[str, ...]:
        return tuple(name for name, option in self.options.items() if option.identity)


def reclaim_us(group: Group, event_us: int) -> int | None:
    """When a stored row may be reclaimed: its ttl and then its grace after its event time (None: never).

    The read path serves a row EXPIRED from ttl to reclaim time and MISSING after it, from the event time alone
    (app/plan.py), so a backend may delete the row at any moment after this one and no earlier: every backend
    then gives the same status for the same row at the same moment, whether or not its cleanup has run.
    """
    after = group.reclaim_after_us
    return None if after is None else min(event_us + after, _LATEST_EXPIRY_US)


# 9999-12-31T00:00:00Z: a later expiry does not fit a Python datetime (the PostgreSQL backend's TIMESTAMPTZ).
_LATEST_EXPIRY_US = 253_402_214_400_000_000


class Footprint(NamedTuple):
    """What one group's values take on one backend (the cost report, app/tiering/cost.py)."""

    keys: int  # stored keys (Redis) or rows (SQL) holding the group: values, and tiles and event ids if any
    bytes: int  # what the backend's docstring says it measures, exactly or extrapolated (`sampled`)
    sampled: bool  # bytes extrapolated from a sample of the keys, not every key measured
    keys_estimated: bool = False  # keys extrapolated too: a count cut short at its time budget


@runtime_checkable
class Measured(Protocol):
    """A backend that can say how many bytes each group holds on it (optional: the cost report shows a backend
    without it as not measured). One call measures several groups, so a store that must walk its keyspace walks
    it once; it spends about `budget_s` at most and raises on failure. The caller caches the answer: measuring
    reads every key or row of a group, it is no hot-path operation."""

    async def footprints(self, groups: Sequence[Group], budget_s: float) -> dict[str, Footprint]: ...
