"""Serving a fetch: read every backend of the plan concurrently under one deadline, decode, count, and merge
into rows in request order with a status and, where not PRESENT, the default per value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from itertools import repeat
from operator import is_
from typing import TYPE_CHECKING, Any

import msgspec
from opentelemetry.trace import Status, StatusCode

from app.auth import check_feature_groups
from app.errors import StrictDegraded, ValidationFailed, describe_error
from app.plan import PRESENT, Cell, GroupPlan, Plan
from app.requests import FetchBody, check_entities, decode_body, format_event_time
from backends.base import server_answered

if TYPE_CHECKING:
    from app.gateway import Gateway


@dataclass(slots=True)
class BackendOutcome:
    status: str = "ok"  # ok | error | timeout | open (circuit open: not asked)
    ms: float = 0.0
    error: str | None = None
    cells: list[list[Cell]] | None = None  # per group of this backend, per unique key


async def _read_backend(
    gw: Gateway,
    backend_name: str,
    plans: list[GroupPlan],
    keys: list[list[str]],
    now_us: int,
    outcome: BackendOutcome,
    limit_s: float | None,
) -> None:
    backend = gw.backends[backend_name]
    breaker = gw.breakers[backend_name].read
    nulls = gw.metrics.null_values
    with gw.span(f"read {backend_name}") as span:
        tracing = span.is_recording()  # attributes below cost real work; skip it with tracing off
        if tracing:
            span.set_attribute("backend.name", backend_name)
            span.set_attribute("backend.type", backend.type)
            span.set_attribute("feature.groups", [p.group.name for p in plans])
            span.set_attribute("feature.keys", sum(len(k) for k in keys))
            span.set_attribute("circuit.state", breaker.state)
        started = time.perf_counter()
        try:
            reads = [(p.group, k) for p, k in zip(plans, keys, strict=True)]
            if limit_s is None:
                blobs = await backend.read(reads)
            else:  # the backend's own timeout bounds it when the request's deadline is more generous
                async with asyncio.timeout(limit_s):
                    blobs = await backend.read(reads)
            outcome.ms = (time.perf_counter() - started) * 1000
            breaker.success()
            outcome.cells = [
                [p.cell(b, now_us, nulls) for b in group_blobs] for p, group_blobs in zip(plans, blobs, strict=True)
            ]
            if tracing:
                found = expired = 0
                for group_cells, p in zip(outcome.cells, plans, strict=True):
                    for c in group_cells:
                        if c is not p.missing:
                            found += 1
                            expired += c is p.expired
                span.set_attribute("feature.found", found)
                span.set_attribute("feature.expired", expired)
                span.set_attribute("outcome", "ok")
        except asyncio.CancelledError:
            # Whoever cancelled accounts for it with the breaker (see _missed): it knows why.
            outcome.ms = (time.perf_counter() - started) * 1000
            outcome.status, outcome.error = "timeout", "missed the deadline"
            span.set_attribute("outcome", "timeout")
            span.set_status(Status(StatusCode.ERROR, "deadline"))
            raise
        except Exception as exc:  # any backend failure degrades the answer, never the service
            if server_answered(exc):
                breaker.abandoned()  # it answered, so it is up: an error of this request, not an outage
            else:
                breaker.failure()
            outcome.ms = (time.perf_counter() - started) * 1000
            if isinstance(exc, TimeoutError):
                outcome.status, outcome.error = "timeout", "backend timeout"
            else:
                outcome.status, outcome.error = "error", describe_error(exc)
            span.set_attribute("outcome", outcome.status)
            span.set_attribute("circuit.state", breaker.state)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def _missed(gw: Gateway, name: str, outcome: BackendOutcome, deadline_ms: float) -> None:
    """A read the deadline cut off. A tight deadline is not the backend's fault; one that kept a request
    waiting past `breaker_slow_ms` is failing (a frozen or black-holed server never answers with an error)."""
    outcome.status, outcome.error, outcome.ms = "timeout", "missed the deadline", deadline_ms
    if deadline_ms >= gw.settings.breaker_slow_ms:
        gw.breakers[name].read.failure()
    else:
        gw.breakers[name].read.abandoned()


def _unique(keys: list[str]) -> tuple[list[str], list[int] | None]:
    """Deduplicated keys, and each row's index into them (None when there were no duplicates)."""
    unique = list(dict.fromkeys(keys))
    if len(unique) == len(keys):
        return keys, None
    at = {k: i for i, k in enumerate(unique)}
    return unique, [at[k] for k in keys]


@dataclass(slots=True)
class FetchResult:
    body: bytes
    backends: dict[str, BackendOutcome]
    degraded: bool


@dataclass(slots=True)
class Served:
    """A fetch answered, before formatting: per group of the plan, its cells in row order."""

    request: FetchBody
    plan: Plan
    columns: list[list[Cell]]
    outcomes: dict[str, BackendOutcome]
    n_rows: int
    degraded: bool


async def fetch(gw: Gateway, raw: bytes, groups: Collection[str] | None = None) -> FetchResult:
    """POST /v1/features/fetch: JSON in, JSON out. `groups`: those the caller's API key may use (None: all)."""
    served = await serve(gw, decode_body(raw, FetchBody, gw.settings), groups)
    rows = merge_rows(served)
    body = msgspec.json.encode(
        {
            "features": served.plan.features,
            "rows": rows,
            "backends": {
                n: {"status": o.status, "ms": round(o.ms, 3)} | ({"error": o.error} if o.error else {})
                for n, o in served.outcomes.items()
            },
            "degraded": served.degraded,
        }
    )
    return FetchResult(body, served.outcomes, served.degraded)


async def serve(gw: Gateway, request: FetchBody, groups: Collection[str] | None = None) -> Served:
    """Validate against the registry, read every backend under the deadline, count usage.

    `groups`: the feature groups the caller's API key may use (None: all).
    """
    settings = gw.settings
    if groups is not None:
        check_feature_groups(request.features, groups)
    plan = gw.plan(request.features)
    n_rows, keys_by_join = check_entities(request.entities, gw.registry, plan.join_keys, settings)
    deadline_ms = settings.default_deadline_ms if request.deadline_ms is None else request.deadline_ms
    if not 0 < deadline_ms <= settings.max_deadline_ms:
        raise ValidationFailed(f"deadline_ms is between 0 and {settings.max_deadline_ms:g}", field="deadline_ms")

    unique = {jk: _unique(keys) for jk, keys in keys_by_join.items()}
    now_us = time.time_ns() // 1000
    outcomes = {name: BackendOutcome() for name, _ in plan.by_backend}
    deadline_s = deadline_ms / 1000
    reads = []
    for name, indexes in plan.by_backend:
        if not gw.breakers[name].read.allow():
            outcome = outcomes[name]
            outcome.status, outcome.error = "open", "circuit open: the backend failed repeatedly; probing it"
            continue
        plans = [plan.groups[i] for i in indexes]
        keys = [unique[p.group.entity.join_key][0] for p in plans]
        limit_s = gw.read_timeout_s[name]
        reads.append(
            (
                name,
                _read_backend(gw, name, plans, keys, now_us, outcomes[name], limit_s if limit_s < deadline_s else None),
            )
        )
    if len(reads) == 1:  # one backend: no task to spawn, the deadline cancels this one
        name, read = reads[0]
        try:
            async with asyncio.timeout(deadline_s):
                await read
        except TimeoutError:
            _missed(gw, name, outcomes[name], deadline_ms)
    elif reads:
        tasks = {name: gw.spawn(read) for name, read in reads}
        try:
            _, pending = await asyncio.wait(tasks.values(), timeout=deadline_s)
        except asyncio.CancelledError:  # our caller gave up (shutdown): the reads must not outlive it
            for name, task in tasks.items():
                if not task.done():
                    task.cancel()
                    gw.breakers[name].read.abandoned()
            raise
        for name, task in tasks.items():
            if task in pending:
                task.cancel()
                _missed(gw, name, outcomes[name], deadline_ms)

    for name, outcome in outcomes.items():  # before any strict 503, so failures are always counted
        gw.metrics.backend_read(name, outcome.status, outcome.ms)
    degraded = any(o.status != "ok" for o in outcomes.values())
    if degraded and request.strict:
        failed = {n: o.error for n, o in outcomes.items() if o.status != "ok"}
        raise StrictDegraded(f"backend(s) {', '.join(failed)} failed and strict was asked", extra={"backends": failed})

    # Per group, its cells in row order.
    columns: list[list[Cell]] = [[]] * len(plan.groups)
    for name, indexes in plan.by_backend:
        cells = outcomes[name].cells
        for slot, i in enumerate(indexes):
            gp = plan.groups[i]
            if cells is None:
                columns[i] = [gp.unavailable] * n_rows
                continue
            at = unique[gp.group.entity.join_key][1]
            columns[i] = cells[slot] if at is None else [cells[slot][j] for j in at]

    _count(plan, columns, n_rows)
    return Served(request, plan, columns, outcomes, n_rows, degraded)


def _count(plan: Plan, columns: list[list[Cell]], n: int) -> None:
    """Feature usage, on the group plan's own counters (the cached plan is bounded; see Gateway.plan)."""
    for gp, column in zip(plan.groups, columns, strict=True):
        slot = gp.usage
        slot[0] += 1
        if column[0] is gp.unavailable:
            slot[4] += n
            continue
        missing = sum(map(is_, column, repeat(gp.missing)))  # identity counts, in C
        expired = sum(map(is_, column, repeat(gp.expired)))
        slot[1] += n - missing - expired
        slot[2] += missing
        slot[3] += expired


def merge_rows(served: Served, *, timestamps: bool | None = None) -> list[dict[str, Any]]:
    """Rows in request order: entity ids, values, statuses (and event times when asked)."""
    plan, columns, request, n_rows = served.plan, served.columns, served.request, served.n_rows
    with_times = request.include_timestamps if timestamps is None else timestamps
    reorder = plan.reorder
    ids = list(request.entities.items())
    widths = [len(gp.positions) for gp in plan.groups]
    stamps: dict[int, str] = {}
    rows = []
    for r in range(n_rows):
        values: tuple[Any, ...] = ()
        statuses: tuple[str, ...] = ()
        for column in columns:
            cell = column[r]
            values += cell[0]
            statuses += cell[1]
        row: dict[str, Any] = {
            "entity": {jk: column_ids[r] for jk, column_ids in ids},
            "values": values if reorder is None else reorder(values),
            "statuses": statuses if reorder is None else reorder(statuses),
        }
        if with_times:
            times: list[str | None] = []
            for column, width in zip(columns, widths, strict=True):
                event_us = column[r][2]
                if event_us is None:
                    times += [None] * width
                else:
                    text = stamps.get(event_us)
                    if text is None:
                        text = stamps[event_us] = format_event_time(event_us)
                    times += [text] * width
            # A value stored as null inside a PRESENT row is MISSING: it has no event time either.
            times = [t if s is PRESENT else None for t, s in zip(times, statuses, strict=True)]
            row["event_timestamps"] = times if reorder is None else reorder(times)
        rows.append(row)
    return rows
