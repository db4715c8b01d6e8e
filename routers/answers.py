"""Encoding a served fetch: rows merged into request order, the JSON answer in one pass, Server-Timing.

The serving core answers per group of the plan (`app.serving.fetch.Served`); the wire shapes live here, with
the measured tricks of the hot path (one msgspec encode of plain tuples, event times formatted once each).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from opentelemetry.trace import Span
from starlette.responses import Response
from starlette.types import Scope

from app.serving.fetch import Served
from app.serving.request import format_event_time
from app.serving.statuses import PRESENT
from app.telemetry import traceresponse


def merge_rows(served: Served, *, timestamps: bool | None = None, all_present: Any = None) -> list[dict[str, Any]]:
    """Rows in request order: entity ids, values, statuses (and event times when asked).

    `all_present`, when given, stands for the statuses of a row whose every value is PRESENT (the encoders
    pass that list pre-encoded: most rows are such, and writing the same status a hundred times per row was a
    quarter of encoding a 100 x 100 answer)."""
    plan, columns, request, n_rows = served.plan, served.columns, served.request, served.n_rows
    with_times = request.include_timestamps if timestamps is None else timestamps
    reorder = plan.reorder
    ids = list(request.entities.items())
    widths = plan.widths
    stamps: dict[int, str] = {}
    rows = []
    # A stored group's PRESENT cell carries its plan's own tuple (GroupPlan.cell): identity says all PRESENT
    present = [gp.present for gp in plan.groups] if all_present is not None and not plan.transforms else None
    for r in range(n_rows):
        # Lists extended in place: concatenating tuples copies the row again for each column (4 columns of a
        # 102-value row: 160 us per 100 rows, against 68 us)
        values: list[Any] = []
        statuses: list[str] | None
        for column in columns:
            values += column[r].values
        if present is not None and all(c[r].statuses is p for c, p in zip(columns, present, strict=True)):
            statuses = None
        else:
            statuses = []
            for column in columns:
                statuses += column[r].statuses
        row: dict[str, Any] = {
            "entity": {jk: column_ids[r] for jk, column_ids in ids},
            "values": values if reorder is None else reorder(values),
            "statuses": all_present if statuses is None else statuses if reorder is None else reorder(statuses),
        }
        if with_times:
            times: list[str | None] = []
            for column, width in zip(columns, widths, strict=True):
                event_us = column[r].event_us
                if event_us is None:
                    times += [None] * width
                else:
                    text = stamps.get(event_us)
                    if text is None:
                        text = stamps[event_us] = format_event_time(event_us)
                    times += [text] * width
            # A value stored as null inside a PRESENT row is MISSING: it has no event time either.
            if statuses is not None:
                times = [t if s is PRESENT else None for t, s in zip(times, statuses, strict=True)]
            row["event_timestamps"] = times if reorder is None else reorder(times)
        rows.append(row)
    return rows


MSGPACK = b"application/msgpack"
_msgpack = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
# Per answer width: the statuses of an all-PRESENT row, pre-encoded as JSON and as MessagePack
_present_raw: dict[int, tuple[msgspec.Raw, msgspec.Raw]] = {}


def wants_msgpack(scope: Scope) -> bool:
    """Whether the caller's Accept asks for MessagePack (it alone, or ranked first: `application/msgpack` or
    the older `application/x-msgpack`); anything else, or no Accept, is answered JSON."""
    for name, value in scope["headers"]:
        if name == b"accept":
            first = value.partition(b",")[0].partition(b";")[0].strip().lower()
            return first in (MSGPACK, b"application/x-msgpack")
    return False


@dataclass(slots=True)
class Reply:
    """A 200 answer of a hot route, as the fast path sends it (or `response()` for the FastAPI route)."""

    content: bytes
    media_type: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", self.media_type),
            (b"content-length", str(len(self.content)).encode()),
            *self.headers,
        ]

    def response(self) -> Response:
        headers = {k.decode(): v.decode() for k, v in self.headers}
        return Response(self.content, media_type=self.media_type.decode(), headers=headers)


def encode_fetch(served: Served, binary: bool = False) -> bytes:
    """The body of POST /v1/features/fetch: JSON, or the same document as MessagePack (`binary`)."""
    plan = served.plan
    raws = _present_raw.get(len(plan.features))
    if raws is None:
        if len(_present_raw) > 1024:  # one pair per answer width asked; bounded all the same
            _present_raw.clear()
        statuses = [PRESENT] * len(plan.features)
        raws = _present_raw[len(plan.features)] = (
            msgspec.Raw(_json.encode(statuses)),
            msgspec.Raw(_msgpack.encode(statuses)),
        )
    answer: dict[str, Any] = {
        "features": plan.features,
        "rows": merge_rows(served, all_present=raws[binary]),
        "backends": {
            n: {"status": o.status, "ms": round(o.ms, 3)} | ({"error": o.error} if o.error else {})
            for n, o in served.outcomes.items()
        },
        "degraded": served.degraded,
    }
    if plan.service is not None:
        answer["service"] = plan.service.name
    if served.transforms:
        answer["transforms"] = {
            n: {"status": t.status, "ms": round(t.ms, 3)} | ({"error": t.error} if t.error else {})
            for n, t in served.transforms.items()
        }
    return (_msgpack if binary else _json).encode(answer)


def server_timing(backend_ms: Iterable[tuple[str, float]], total_ms: float, transform_ms: float | None = None) -> str:
    """`hot;dur=0.41, bulk;dur=1.20, transform;dur=0.05, total;dur=1.9` (backend names are registry
    identifiers: token-safe; `transform` is the time in on-demand functions, when the request had any)."""
    parts = [f"{name};dur={ms:.2f}" for name, ms in backend_ms]
    if transform_ms is not None:
        parts.append(f"transform;dur={transform_ms:.2f}")
    parts.append(f"total;dur={total_ms:.2f}")
    return ", ".join(parts)


def timing_of(served: Served, total_ms: float) -> str:
    """The Server-Timing header of a served fetch; a cached group's cache read as `bulk.cache;dur=0.21;desc="hot 97 hit
    3 miss"` beside its backend's (whose time includes it; no comma or semicolon inside, for simple parsers), and the
    keys of groups with local_cache_ms as `hot.local;desc="97 hit 3 miss"` (plus `N coalesced`: waited for another
    request's read of the worker)."""
    transform_ms = served.transform_ms if served.transforms else None
    header = server_timing(((n, o.ms) for n, o in served.outcomes.items()), total_ms, transform_ms)
    extra = [
        f'{name}.cache;dur={c.ms:.2f};desc="{c.backend} {c.hits} hit {c.misses} miss"'
        for name, o in served.outcomes.items()
        for c in o.cache or ()
    ]
    for name, o in served.outcomes.items():
        if o.local is not None:
            held, coalesced, missed = o.local
            also = f" {coalesced} coalesced" if coalesced else ""
            extra.append(f'{name}.local;desc="{held} hit {missed} miss{also}"')
    return header if not extra else ", ".join([*extra, header])


def trace_header(span: Span) -> list[tuple[bytes, bytes]]:
    """`traceresponse` as a raw header, or none (tracing off or not sampled)."""
    value = traceresponse(span)
    return [] if value is None else [(b"traceresponse", value.encode())]


def with_trace(headers: dict[str, str], span: Span) -> dict[str, str]:
    """`headers` plus `traceresponse`, which tells the caller the trace its request is in (tracing on)."""
    value = traceresponse(span)
    if value is not None:
        headers["traceresponse"] = value
    return headers
