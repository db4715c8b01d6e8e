"""Request bodies, decoded and checked straight from bytes with msgspec (no pydantic on the hot path).

The pydantic models in `routers/models.py` describe the same bodies for the OpenAPI spec; the tests hold
the two to each other.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec

from app.errors import BadRequest, TooLarge, ValidationFailed
from app.registry import Entity, Registry
from app.settings import Settings

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")


class FetchBody(msgspec.Struct, forbid_unknown_fields=True):
    # Ids are checked against each entity's dtype by `entity_key`, which names the exact field.
    entities: dict[str, list[Any]]
    features: list[str]
    deadline_ms: float | None = None
    include_timestamps: bool = False
    strict: bool = False


class WriteBody(msgspec.Struct, forbid_unknown_fields=True):
    group: str
    rows: list[dict[str, Any]]


_LENIENT: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {}


def _lenient_decoder(kind: type[msgspec.Struct]) -> msgspec.json.Decoder[Any]:
    decoder = _LENIENT.get(kind)
    if decoder is None:
        decoder = _LENIENT[kind] = msgspec.json.Decoder(kind, float_hook=float)
    return decoder


def decode_body(body: bytes, kind: type[msgspec.Struct], settings: Settings) -> Any:
    if len(body) > settings.max_body_bytes:
        raise TooLarge(f"the body is {len(body)} bytes; the limit is {settings.max_body_bytes}", field="(body)")
    try:
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as exc:
            if not str(exc).startswith("Number out of range"):
                raise
        # A number literal past float64 (1e309) in a free-form value (an id, a row's feature): decoded as
        # infinity, the dtype checks that follow refuse it naming the exact field (msgspec cannot: `[...]`).
        return _lenient_decoder(kind).decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _MSGSPEC_PATH.search(message)
        # `[...]` stands for "some key of this object" in msgspec's paths: name the object instead.
        field = match[1].lstrip(".").partition("[...]")[0] if match else ""
        reason = message[: match.start()] if match else message
        if reason.startswith("Object missing required field"):
            field = ".".join(filter(None, (field, message.split("`")[1])))  # name the missing field itself
        elif reason.startswith("Object contains unknown field"):
            reason = f"unknown field; expected one of {', '.join(kind.__struct_fields__)}"
            field = message.split("`")[1] if not match else field
        raise ValidationFailed(reason, field=field or "(body)") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", field="(body)") from None
    except UnicodeDecodeError:
        # msgspec raises this (not DecodeError) for a string that is not UTF-8.
        raise BadRequest("the body is not valid UTF-8", field="(body)") from None
    except RecursionError:
        # msgspec refuses nesting past the interpreter's recursion limit at once, before building anything.
        raise BadRequest("the body is nested too deeply", field="(body)") from None


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 40, 40


def _short(value: Any) -> str:
    """A bounded repr for error messages: a deeply nested or huge value costs a few levels, not a recursion."""
    text = _repr.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def entity_key(entity: Entity, value: Any, field: str, settings: Settings) -> str:
    """The canonical storage key of one id, after checking it against the entity's dtype."""
    if entity.dtype.kind == "int64":
        if type(value) is not int:
            raise ValidationFailed(f"{entity.join_key} ids are int64; got {_short(value)}", field=field)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValidationFailed("id out of int64 range", field=field)
        return str(value)
    if type(value) is not str:
        raise ValidationFailed(f"{entity.join_key} ids are strings; got {_short(value)}", field=field)
    if not value or len(value) > settings.max_key_length:
        raise ValidationFailed(f"a string id has 1 to {settings.max_key_length} characters", field=field)
    if "\x00" in value:
        # PostgreSQL/CockroachDB TEXT cannot hold NUL: refused here so every backend treats the id alike.
        raise ValidationFailed("a string id may not contain NUL (U+0000)", field=field)
    return value


def check_entities(
    entities: Mapping[str, list[Any]], registry: Registry, needed: AbstractSet[str], settings: Settings
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
        if len(ids) > settings.max_entities:
            raise TooLarge(f"{len(ids)} entities; the limit is {settings.max_entities}", field=f"entities.{join_key}")
        if rows == -1:
            rows = len(ids)
        elif len(ids) != rows:
            raise ValidationFailed(
                f"every join key needs the same number of ids ({rows})", field=f"entities.{join_key}"
            )
        keys[join_key] = [entity_key(entity, v, f"entities.{join_key}[{i}]", settings) for i, v in enumerate(ids)]
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
