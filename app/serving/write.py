"""The write path: validate every row against the group's dtypes first, then store the batch in one call.

A row names the join key, an optional `event_timestamp` (RFC 3339; now when absent) and every feature of the
group (null for no value): a group is stored as one blob, so a partial row would silently erase the
features it left out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from app.auth import check_write_group
from app.errors import BackendFailed, TooLarge, ValidationFailed, describe_error
from app.registry.model import Group
from app.serving.limits import Limits
from app.serving.request import WriteRequest, entity_key, format_event_time, parse_event_time
from app.storage.codec import CodecError
from backends.base import WriteResult, WriteRow

T = TypeVar("T")

if TYPE_CHECKING:
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation

log = logging.getLogger(__name__)

EVENT_TIMESTAMP = "event_timestamp"


class Written(msgspec.Struct):
    """What a write did: rows stored, and rows skipped because what is stored (or sent with them) is newer."""

    group: str
    written: int
    skipped_stale: int


def encode_rows(group: Group, rows: Sequence[dict[str, Any]], limits: Limits) -> tuple[list[WriteRow], int]:
    """Validate and encode rows. Returns one row per entity (the newest) and how many older duplicates fell."""
    now_us = time.time_ns() // 1000
    latest_us = latest_event_us(limits, now_us)
    return keep_newest(encode_row(group, row, limits, now_us, f"rows[{i}]", latest_us) for i, row in enumerate(rows))


def latest_event_us(limits: Limits, now_us: int) -> int:
    """The latest event time a row may carry, read off the clock at `now_us`.

    A row far in the future would freeze its entity: every real write after it is older, so skipped as stale,
    and the future value is served PRESENT until the clock catches up. Writers' clocks drift a little, so the
    bound is a margin (`max_future_event_ms`), not the present.
    """
    return now_us + int(limits.max_future_event_ms * 1000)


def encode_row(
    group: Group, row: dict[str, Any], limits: Limits, default_us: int, where: str, latest_us: int
) -> WriteRow:
    """Validate and encode one row; `default_us` is its event time when it has none, `latest_us` the latest it
    may have (see latest_event_us). Errors name `{where}.{field}`."""
    join_key = group.entity.join_key
    if join_key not in row:
        raise ValidationFailed(f"row lacks its join key {join_key!r}", field=f"{where}.{join_key}")
    for name in row:
        if name != join_key and name != EVENT_TIMESTAMP and name not in group.by_name:
            raise ValidationFailed(
                f"unknown field {name!r}; group {group.name} has {', '.join(group.by_name)}",
                field=f"{where}.{name}",
            )
    key = entity_key(group.entity, row[join_key], f"{where}.{join_key}", limits.max_key_length)
    event_us = default_us
    if row.get(EVENT_TIMESTAMP) is not None:
        field = f"{where}.{EVENT_TIMESTAMP}"
        event_us = parse_event_time(row[EVENT_TIMESTAMP], field)
        if event_us > latest_us:
            ahead_s = (event_us - latest_us) / 1e6 + limits.max_future_event_ms / 1000
            raise ValidationFailed(
                f"{row[EVENT_TIMESTAMP]!r} is {_duration(ahead_s)} ahead of the gateway's clock "
                f"({format_event_time(latest_us - int(limits.max_future_event_ms * 1000))}); an event time may be "
                f"at most {_duration(limits.max_future_event_ms / 1000)} ahead, so that a wrong clock cannot "
                "freeze an entity",
                field=field,
            )
    stored: list[Any] = []
    for feature in group.features:
        if feature.name not in row:
            raise ValidationFailed(
                f"row lacks feature {feature.name!r}; a group's row is written whole, send null for no value",
                field=f"{where}.{feature.name}",
            )
        value = row[feature.name]
        try:
            stored.append(None if value is None else feature.dtype.check(value))
        except CodecError as exc:
            raise ValidationFailed(str(exc), field=f"{where}.{feature.name}") from None
    return WriteRow(key, event_us, group.codec.encode(event_us, stored))


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.4g} {unit}"
    return f"{seconds:.4g} s"


def keep_newest(rows: Iterable[WriteRow]) -> tuple[list[WriteRow], int]:
    """One row per entity key, the newest (the later one on a tie), and how many older duplicates fell."""
    newest: dict[str, WriteRow] = {}
    dropped = 0
    for row in rows:
        previous = newest.get(row.key)
        if previous is not None:
            dropped += 1
            if previous.event_us > row.event_us:
                continue
        newest[row.key] = row
    return list(newest.values()), dropped


async def store(gw: Gateway, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
    """Write encoded rows to the group's backend, through its circuit breaker and under the write timeout, then
    to its cache (app/tiering/cache.py): after it returns, no read of this worker sees an older value.

    Any failure is a BackendFailed; retrying one is safe (a row never replaces newer data).

    Whatever the outcome, every worker's local cache (app/serving/local_cache.py) drops these keys last, once the
    stores have them: no fetch of this gateway that starts after the write returned is served an older copy.
    """
    try:
        return await _store(gw, group, rows)
    finally:
        gw.local_cache.written(group.name, [row.key for row in rows])


async def _store(gw: Gateway, group: Group, rows: Sequence[WriteRow]) -> WriteResult:
    # The registry generation `group` was read from (no await since): its backends, whatever a reload swaps in
    with gw.pinned() as generation:
        backend = generation.backends[group.backend]
        result = await guarded_write(
            gw,
            group,
            len(rows),
            "a row never replaces newer data",
            lambda: backend.write(group, rows),
            generation=generation,
        )
        try:
            other = group.also_written
            if other is not None:  # a move: the other copy must have it too before the write is confirmed
                await guarded_write(
                    gw,
                    group,
                    len(rows),
                    f"the group is moving between {group.backend} and {other} and a row never replaces newer data",
                    lambda: generation.backends[other].write(group, rows),
                    backend=other,
                    generation=generation,
                )
        finally:  # the system of record has the rows: its cache must not keep older copies, whatever came after
            if group.cache is not None and group.cache.backend in generation.backends:
                # never fails the write: a copy it could not update is held dirty
                await gw.cache.written(group, rows, generation.backends, generation.breakers)
    return result


async def guarded_write(
    gw: Gateway,
    group: Group,
    count: int,
    why_safe: str,
    call: Callable[[], Awaitable[T]],
    backend: str | None = None,
    generation: Generation | None = None,
) -> T:
    """A write of `count` rows or events of `group` to its backend (or `backend`), through the backend's write
    circuit and under the write timeout, in a span. Any failure is a BackendFailed saying why a retry is safe.

    `generation`: the registry generation `call`'s backend is of (None: the current one, looked up in the same step
    as the caller looked up its backend)."""
    generation = generation or gw.current
    name = backend or group.backend
    store = generation.backends[name]
    breaker = generation.breakers[name].write
    if not breaker.allow():
        raise BackendFailed(
            f"writes to backend {name} failed repeatedly and its write circuit is open; nothing was "
            "written, retry shortly",
            field="group",
            extra={"backend": name},
        )
    with gw.span(f"write {name}") as span:
        span.set_attribute("backend.name", name)
        span.set_attribute("backend.type", store.type)
        span.set_attribute("feature.groups", [group.name])
        span.set_attribute("feature.keys", count)
        started = time.perf_counter()
        try:
            # Pinned: a reload meanwhile closes this backend only once the write is over
            with gw.pinned(generation):
                async with asyncio.timeout(gw.limits.write_timeout_ms / 1000):
                    result = await call()
        except Exception as exc:
            if store.server_answered(exc):
                breaker.abandoned()  # e.g. Redis OOM or a read-only replica: writes fail, reads still work
            elif isinstance(exc, TimeoutError) and not gw.blames(name, "write", started):
                breaker.abandoned()  # the wait was the worker's own (see Gateway.blames)
            else:
                breaker.failure()
            span.record_exception(exc)
            detail = "timed out" if isinstance(exc, TimeoutError) else describe_error(exc)
            log.warning(
                "write of %d row(s) of group %s to backend %s failed (%s); write circuit %s",
                count,
                group.name,
                name,
                detail,
                breaker.state,
            )
            raise BackendFailed(
                f"backend {name} did not confirm the write ({detail}); retrying is safe, {why_safe}",
                field="group",
                extra={"backend": name},
            ) from None
        except asyncio.CancelledError:
            breaker.abandoned()
            raise
        breaker.success()
        gw.answered(name, "write")
        span.set_attribute("outcome", "ok")
    return result


async def write(gw: Gateway, request: WriteRequest, groups: Collection[str] | None = None, via: str = "api") -> Written:
    """Validate every row, then store the batch. `groups`: those the caller's API key may write (None: all).
    `via`: who wrote, in the group's write counts (/v1/usage)."""
    limits = gw.limits
    if groups is not None:
        check_write_group(request.group, groups)
    group = gw.registry.groups.get(request.group)
    if group is None:
        raise ValidationFailed(f"unknown group; groups: {', '.join(gw.registry.groups)}", field="group")
    if group.streaming is not None:
        raise ValidationFailed(
            f"{group.name} aggregates stream {group.streaming.stream}: send its events to "
            f"POST /v1/events/{group.streaming.stream}",
            field="group",
        )
    if not request.rows:
        raise ValidationFailed("give at least one row", field="rows")
    if len(request.rows) > limits.max_write_rows:
        raise TooLarge(f"{len(request.rows)} rows; the limit is {limits.max_write_rows}", field="rows")
    rows, dropped = encode_rows(group, request.rows, limits)
    result = await store(gw, group, rows)
    gw.metrics.written(group.name, via, result.written, result.skipped_stale + dropped)
    return Written(group.name, result.written, result.skipped_stale + dropped)
