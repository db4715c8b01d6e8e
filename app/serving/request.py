"""The typed requests the serving core takes, and the checks of their parts: ids, entities, event times.

`routers/decode.py` turns body bytes into these with msgspec (no pydantic on the hot path); the pydantic models
in `routers/models.py` describe the same bodies for the OpenAPI spec, and the tests hold the two to each other.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec

from app.errors import TooLarge, ValidationFailed
from app.registry.model import Entity, Registry
from app.serving.limits import Limits

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class FetchRequest(msgspec.Struct, forbid_unknown_fields=True):
    # Ids are checked against each entity's dtype by `entity_key`, which names the exact field.
    entities: dict[str, list[Any]]
    features: list[str] | None = None  # exactly one of features and service (checked by the fetch)
    service: str | None = None
    context: dict[str, list[Any]] | None = None  # request fields of on-demand features, one per entity row
    deadline_ms: float | None = None
    include_timestamps: bool = False
    strict: bool = False


class WriteRequest(msgspec.Struct, forbid_unknown_fields=True):
    group: str
    rows: list[dict[str, Any]]


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 40, 40


def _short(value: Any) -> str:
    """A bounded repr for error messages: a deeply nested or huge value costs a few levels, not a recursion."""
    text = _repr.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def entity_key(entity: Entity, value: Any, field: str, max_key_length: int) -> str:
    """The canonical storage key of one id, after checking it against the entity's dtype."""
    if entity.dtype.kind == "int64":
        if type(value) is not int:
            raise ValidationFailed(f"{entity.join_key} ids are int64; got {_short(value)}", field=field)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValidationFailed("id out of int64 range", field=field)
        return str(value)
    if type(value) is not str:
        raise ValidationFailed(f"{entity.join_key} ids are strings; got {_short(value)}", field=field)
    if not value or len(value) > max_key_length:
        raise ValidationFailed(f"a string id has 1 to {max_key_length} characters", field=field)
    if "\x00" in value:
        # PostgreSQL/CockroachDB TEXT cannot hold NUL: refused here so every backend treats the id alike.
        raise ValidationFailed("a string id may not contain NUL (U+0000)", field=field)
    return value


def check_entities(
    entities: Mapping[str, list[Any]], registry: Registry, needed: AbstractSet[str], limits: Limits
) -> tuple[int, dict[str, list[str]]]:
    """Validate the `entities` object: known join keys, equal non-empty columns, ids of the right dtype.

    Returns the row count and, per join key, the canonical storage keys.
    """
    if not entities:
        raise ValidationFailed("give at least one join key with its ids", field="entities")
    rows = -1
    keys: dict[str, list[str]] = {}
    for join_key, ids in entities.items():
        entity = registry.join_keys.get(join_key)
        if entity is None or join_key not in needed:
            reason = "unknown join key" if entity is None else "no requested feature uses this join key"
            raise ValidationFailed(
                f"{reason}; the requested features need {', '.join(sorted(needed))}", field=f"entities.{join_key}"
            )
        if not ids:
            raise ValidationFailed("the list of ids is empty", field=f"entities.{join_key}")
        if len(ids) > limits.max_entities:
            raise TooLarge(f"{len(ids)} entities; the limit is {limits.max_entities}", field=f"entities.{join_key}")
        if rows == -1:
            rows = len(ids)
        elif len(ids) != rows:
            raise ValidationFailed(
                f"every join key needs the same number of ids ({rows})", field=f"entities.{join_key}"
            )
        longest = limits.max_key_length
        keys[join_key] = [entity_key(entity, v, f"entities.{join_key}[{i}]", longest) for i, v in enumerate(ids)]
    missing = needed - keys.keys()
    if missing:
        raise ValidationFailed(
            f"the requested features need ids for {', '.join(sorted(missing))}", field=f"entities.{sorted(missing)[0]}"
        )
    return rows, keys


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Past these, formatting the time (include_timestamps) or its reclaim time overflows Python's datetime: such a
# row would poison every later read of its entity. Inclusive bounds, stated exactly in the error text.
EARLIEST_EVENT = datetime(1, 1, 2, tzinfo=UTC)
LATEST_EVENT = datetime(9999, 12, 30, tzinfo=UTC)

# RFC 3339 section 5.6 date-time: a full date, a time with seconds, and an offset are all required ("T" or, as
# its note allows, a space between them). Python's fromisoformat alone also takes dates without a time, week
# dates and naive times, which would silently mean UTC.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
RFC3339_EXAMPLE = "2026-11-26T10:00:00Z"


def _micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


EARLIEST_EVENT_US = _micros(EARLIEST_EVENT)
LATEST_EVENT_US = _micros(LATEST_EVENT)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def parse_event_time(value: Any, field: str) -> int:
    """RFC 3339 text -> microseconds since the epoch. Strict: time and offset are required, and digits past the
    microsecond are refused unless they are zeros (silently cutting them would reorder two events)."""
    if type(value) is not str:
        raise ValidationFailed(f"expected an RFC 3339 timestamp such as {RFC3339_EXAMPLE}", field=field)
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValidationFailed(
            f"{_short(value)} is not an RFC 3339 timestamp (a date, a time with seconds and an offset, such as "
            f"{RFC3339_EXAMPLE} or 2026-11-26T11:00:00.5+01:00)",
            field=field,
        )
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    fraction = fraction or ""
    if len(fraction) > 6 and fraction[6:].strip("0"):
        raise ValidationFailed(
            f"{_short(value)} is more precise than a microsecond, which is the finest an event time is stored at",
            field=field,
        )
    offset = 0
    if not zulu:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValidationFailed(f"{_short(value)} has an offset past +-23:59", field=field)
        offset = (int(off_h) * 60 + int(off_m)) * (1 if sign == "+" else -1)
    try:
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int(fraction[:6].ljust(6, "0")),
            tzinfo=timezone(timedelta(minutes=offset)),
        )
    except ValueError as exc:
        raise ValidationFailed(f"{_short(value)} is not a valid date and time: {exc}", field=field) from None
    event_us = _micros(moment)
    if not EARLIEST_EVENT_US <= event_us <= LATEST_EVENT_US:
        raise ValidationFailed(
            f"{_short(value)} is out of range: an event time is between {_iso(EARLIEST_EVENT)} and "
            f"{_iso(LATEST_EVENT)} inclusive",
            field=field,
        )
    return event_us


def format_event_time(event_us: int) -> str:
    # Integer arithmetic: through a float, times far from 1970 lose microseconds (30 us in year 9999).
    return (_EPOCH + timedelta(microseconds=event_us)).isoformat().replace("+00:00", "Z")
