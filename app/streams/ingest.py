"""Taking events in: each checked against its stream (one bad event refuses the batch, naming it), then, for
every aggregation group of the stream, late ones counted and dropped and the rest applied to the group's tile
store in one atomic, idempotent batch (backends/base.py TileStore).

The same path serves `POST /v1/events/{stream}` and the stream consumers: an event id makes a resent event
count once (a consumer derives one from the source's position when the event has none).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import msgspec

from app.errors import TooLarge, ValidationFailed
from app.registry.model import Group, Registry, Stream
from app.serving.limits import Limits
from app.serving.request import entity_key, parse_event_time
from app.serving.write import guarded_write, latest_event_us
from app.storage.codec import CodecError
from app.streams.tiles import Event, batch_for_store
from app.streams.windows import is_late

if TYPE_CHECKING:
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation
    from backends.base import TileStore

MAX_EVENT_ID = 200  # characters
_MS_LIMIT = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z in epoch milliseconds


class EventsRequest(msgspec.Struct, forbid_unknown_fields=True):
    events: list[dict[str, Any]]


class GroupCounts(msgspec.Struct):
    accepted: int = 0  # new to the group and merged into its tiles
    duplicates: int = 0  # seen before (or twice in this batch): counted once
    late: int = 0  # more than the group's allowed_lateness behind: dropped


class Ingested(msgspec.Struct):
    stream: str
    accepted: int
    duplicates: int
    late: int
    groups: dict[str, GroupCounts]


def parse_events(stream: Stream, raw: Sequence[Any], limits: Limits) -> list[Event]:
    """The events of a batch, checked: an id, the entity's id, an event time (RFC 3339, or epoch milliseconds),
    declared fields of their dtypes (null or absent: no value). ValidationFailed names the first bad field."""
    if not raw:
        raise ValidationFailed("give at least one event", field="events")
    if len(raw) > limits.max_write_rows:
        raise TooLarge(f"{len(raw)} events; the limit is {limits.max_write_rows}", field="events")
    join_key, time_field = stream.entity.join_key, stream.event_time
    known = {"event_id", join_key, time_field, *stream.fields}
    latest_us = latest_event_us(limits, time.time_ns() // 1000)
    events = []
    for i, item in enumerate(raw):
        path = f"events[{i}]"
        if not isinstance(item, dict):
            raise ValidationFailed("an event is an object", field=path)
        for name in item:
            if name not in known:
                raise ValidationFailed(
                    f"unknown field; stream {stream.name} has {', '.join(sorted(known))}", field=f"{path}.{name}"
                )
        event_id = item.get("event_id")
        if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID or not _storable(event_id):
            raise ValidationFailed(
                f"an event id is a string of 1 to {MAX_EVENT_ID} characters (valid UTF-8, no NUL)",
                field=f"{path}.event_id",
            )
        if join_key not in item:
            raise ValidationFailed("the event's entity id is required", field=f"{path}.{join_key}")
        key = entity_key(stream.entity, item[join_key], f"{path}.{join_key}", limits.max_key_length)
        event_us = event_time(item.get(time_field), f"{path}.{time_field}")
        if event_us > latest_us:  # as for writes: a clock far ahead would count the event in windows to come
            raise ValidationFailed(
                f"the event time is more than {limits.max_future_event_ms / 1000:g} s ahead of the gateway's clock",
                field=f"{path}.{time_field}",
            )
        fields: dict[str, Any] = {}
        for name, dtype in stream.fields.items():
            value = item.get(name)
            if value is not None:
                try:
                    value = dtype.output(dtype.check(value))
                except CodecError as exc:
                    raise ValidationFailed(str(exc), field=f"{path}.{name}") from None
                if isinstance(value, str) and not _storable(value):
                    raise ValidationFailed("not valid UTF-8 text (a lone surrogate)", field=f"{path}.{name}")
            fields[name] = value
        events.append(Event(event_id, key, event_us, fields))
    return events


def _storable(text: str) -> bool:
    """Text every store takes: encodable as UTF-8 (JSON may carry lone surrogates) and without NUL (PostgreSQL
    TEXT refuses it). A message that can never be stored would otherwise be retried forever."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def event_time(value: Any, field: str) -> int:
    """RFC 3339 text, or an integer of epoch milliseconds (what Kafka and Redis Streams producers often send)."""
    if type(value) is int:
        if not 0 <= value <= _MS_LIMIT:
            raise ValidationFailed("epoch milliseconds between 1970 and 9999", field=field)
        return value * 1000
    if value is None:
        raise ValidationFailed("the event time is required (RFC 3339, or epoch milliseconds)", field=field)
    return parse_event_time(value, field)


def aggregation_groups(registry: Registry, stream: str) -> list[Group]:
    return [g for g in registry.groups.values() if g.streaming is not None and g.streaming.stream == stream]


async def ingest(gw: Gateway, stream: Stream, events: Sequence[Event], now_us: int | None = None) -> Ingested:
    """Apply a checked batch to every aggregation group of its stream, concurrently; the counts per group and in
    all (an event feeding two groups counts in each)."""
    generation = gw.current
    groups = aggregation_groups(generation.registry, stream.name)
    if not groups:
        raise ValidationFailed(f"no aggregation group reads stream {stream.name}", field="stream")
    now = time.time_ns() // 1000 if now_us is None else now_us
    # The groups' backends are taken from this generation when each task starts, a reload perhaps in between
    with gw.pinned(generation):
        counts = await asyncio.gather(*(_apply(gw, generation, group, events, now) for group in groups))
    by_group = {g.name: c for g, c in zip(groups, counts, strict=True)}
    return Ingested(
        stream.name,
        sum(c.accepted for c in counts),
        sum(c.duplicates for c in counts),
        sum(c.late for c in counts),
        by_group,
    )


async def _apply(
    gw: Gateway, generation: Generation, group: Group, events: Sequence[Event], now_us: int
) -> GroupCounts:
    streaming = group.streaming
    assert streaming is not None
    lateness_us = int(streaming.allowed_lateness_s * 1_000_000)
    fresh = [e for e in events if not is_late(e.event_us, now_us, lateness_us)]
    counts = GroupCounts(late=len(events) - len(fresh))
    if not fresh:
        return counts
    aggregations: Mapping[str, Any] = streaming.by_name
    ids, tiles, fold = batch_for_store(aggregations, fresh)
    keep_us = streaming.keep_us + int(gw.limits.max_future_event_ms * 1000)
    store = cast("TileStore", generation.backends[group.backend])
    new = await guarded_write(
        gw,
        group,
        len(fresh),
        "an event counts once, by its id",
        # Ids outlive the longest window and the lateness by the future margin too: an event stamped ahead of the
        # clock and resent later must still be known when it is not yet late
        lambda: store.apply(group.name, ids, tiles, fold, keep_us, streaming.tile_keep_us),
        generation=generation,
    )
    counts.accepted = new
    counts.duplicates = len(fresh) - new
    return counts
