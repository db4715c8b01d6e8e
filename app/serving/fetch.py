"""Serving a fetch: read every backend of the plan concurrently under one deadline, decode and count.

`serve` takes a decoded FetchRequest and answers a `Served`: per group of the plan, a cell per row (values,
statuses, event time), ready for `routers/` to merge into request order and encode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from itertools import repeat
from operator import is_
from typing import TYPE_CHECKING, cast

from opentelemetry.trace import Status as SpanStatus
from opentelemetry.trace import StatusCode

from app.auth import check_feature_groups
from app.errors import Forbidden, Overloaded, StrictDegraded, ValidationFailed, describe_error
from app.serving.local_cache import read_through
from app.serving.plan import GroupPlan, Plan
from app.serving.request import FetchRequest, check_entities
from app.serving.statuses import EXPIRED, MISSING, PRESENT, UNAVAILABLE, BackendOutcome, Cell, Outcome
from app.serving.transforms import TransformOutcome, check_context, run_transforms
from app.serving.usage import UsageCounts
from app.streams.serve import read_windows
from backends.base import FeatureBackend, PartialRead

if TYPE_CHECKING:
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation
    from backends.base import TileStore


async def _read_backend(
    gw: Gateway,
    generation: Generation,
    backend_name: str,
    plans: list[GroupPlan],
    keys: list[list[str]],
    now_us: int,
    outcome: BackendOutcome,
    limit_s: float | None,
    deadline_at: float | None = None,
    circuit_open: bool = False,
) -> None:
    """`circuit_open`: the backend is not asked (its read circuit is open); only its groups' caches are read.

    Backends and circuits come from the request's generation, not the gateway's: a reload meanwhile may have
    replaced or removed them."""
    backend = generation.backends[backend_name]
    breaker = generation.breakers[backend_name].read
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
        # Through a cache, the backend's own timeout counts from when it is asked, after the cache (app/tiering)
        cached = circuit_open or any(p.group.cache or p.group.local_cache_ms for p in plans)
        read = _read_cells(
            gw,
            generation,
            None if circuit_open else backend,
            plans,
            keys,
            now_us,
            nulls,
            outcome,
            deadline_at,
            limit_s if cached else None,
        )
        try:
            if limit_s is None or cached:
                outcome.cells = await read
            else:  # the backend's own timeout bounds it when the request's deadline is more generous
                async with asyncio.timeout(limit_s):
                    outcome.cells = await read
            outcome.ms = (time.perf_counter() - started) * 1000
            if outcome.asked:
                breaker.success()
                gw.answered(backend_name, "read")
            else:  # served wholly from the caches: it was not asked, and a probe slot it took goes back
                breaker.abandoned()
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
            outcome.status, outcome.error = Outcome.TIMEOUT, "missed the deadline"
            span.set_attribute("outcome", str(Outcome.TIMEOUT))
            span.set_status(SpanStatus(StatusCode.ERROR, "deadline"))
            raise
        except _Partial as partial:  # some keys failed (a cluster master down, or served from a cache only)
            exc = partial.cause
            cause = exc.__cause__
            outcome.ms = (time.perf_counter() - started) * 1000
            outcome.cells = partial.cells
            if exc.answered:  # the backend answered for the rest: skipping all of it would serve less
                breaker.success()
                gw.answered(backend_name, "read")
                outcome.status, outcome.error = Outcome.ERROR, describe_error(exc)
            elif cause is None:  # not asked: its circuit is open, its groups' caches answered
                outcome.status, outcome.error = Outcome.OPEN, str(exc)
            else:
                _failed(gw, backend, backend_name, cause, started)
                timeout = isinstance(cause, TimeoutError)
                outcome.status = Outcome.TIMEOUT if timeout else Outcome.ERROR
                outcome.error = str(exc)
            span.set_attribute("outcome", str(outcome.status))
            span.record_exception(exc)
            span.set_status(SpanStatus(StatusCode.ERROR, type(exc).__name__))
        except Exception as exc:  # any backend failure degrades the answer, never the service
            _failed(gw, backend, backend_name, exc, started)
            outcome.ms = (time.perf_counter() - started) * 1000
            if isinstance(exc, TimeoutError):
                outcome.status, outcome.error = Outcome.TIMEOUT, "backend timeout"
            else:
                outcome.status, outcome.error = Outcome.ERROR, describe_error(exc)
            span.set_attribute("outcome", str(outcome.status))
            span.set_attribute("circuit.state", breaker.state)
            span.record_exception(exc)
            span.set_status(SpanStatus(StatusCode.ERROR, type(exc).__name__))


def _failed(gw: Gateway, backend: FeatureBackend, name: str, exc: BaseException, started: float) -> None:
    """A read of `name` that failed with `exc`, for its breaker."""
    breaker = gw.breakers[name].read
    if backend.server_answered(exc):
        breaker.abandoned()  # it answered, so it is up: an error of this request, not an outage
    elif isinstance(exc, TimeoutError) and not gw.blames(name, "read", started):
        breaker.abandoned()  # its own timeout ran out, but the wait was ours (see Gateway.blames)
    else:
        breaker.failure()


class _Partial(Exception):
    """A read whose cells are all made, some UNAVAILABLE: `cause` says why, and whether the backend answered."""

    def __init__(self, cells: list[list[Cell]], cause: PartialRead):
        self.cells = cells
        self.cause = cause


async def _read_cells(
    gw: Gateway,
    generation: Generation,
    backend: FeatureBackend | None,
    plans: list[GroupPlan],
    keys: list[list[str]],
    now_us: int,
    nulls: dict[tuple[str, int], int],
    outcome: BackendOutcome,
    deadline_at: float | None,
    limit_s: float | None,
) -> list[list[Cell]]:
    """Per plan, a cell per key: stored groups in one `read` (through their caches when they have one),
    aggregation groups from their tiles, concurrently. `backend` None: not asked, only the caches are read."""
    stored = [i for i, p in enumerate(plans) if p.group.streaming is None]
    windowed = [i for i, p in enumerate(plans) if p.group.streaming is not None]
    cells: list[list[Cell]] = [[] for _ in plans]
    partial: list[PartialRead] = []

    async def read_stored() -> None:
        reads = [(plans[i].group, keys[i]) for i in stored]
        failed: list[set[int]] | None = None
        try:
            if any(g.local_cache_ms for g, _ in reads):  # this worker's memory first (app/serving/local_cache.py)
                blobs = await read_through(gw, generation, backend, reads, deadline_at, limit_s, outcome)
            elif backend is not None and not any(p.group.cache for p in plans):
                blobs = await backend.read(reads)
            else:
                outcome.cache = []
                answer = await gw.cache.read(generation, backend, reads, deadline_at, limit_s, outcome.cache)
                blobs, outcome.asked = answer.blobs, answer.asked
        except PartialRead as exc:
            partial.append(exc)
            blobs, failed = exc.blobs, exc.failed
        for slot, (i, group_blobs) in enumerate(zip(stored, blobs, strict=True)):
            plan = plans[i]
            if failed is None or not failed[slot]:
                cells[i] = [plan.cell(b, now_us, nulls) for b in group_blobs]
            else:
                lost, cell, lost_cell = failed[slot], plan.cell, plan.unavailable
                cells[i] = [lost_cell if j in lost else cell(b, now_us, nulls) for j, b in enumerate(group_blobs)]

    async def read_windowed(i: int) -> None:
        plan = plans[i]
        streaming = plan.group.streaming
        assert streaming is not None
        if streaming.max_lag_s is not None and gw.freshness.behind(streaming.stream, streaming.max_lag_s):
            # The stream's consumers are further behind than the group accepts: a count frozen by a stalled
            # consumer would look like a quiet entity's, so nothing is read and every value is its default
            cells[i] = [plan.expired] * len(keys[i])
            return
        if backend is None:
            cells[i] = [plan.unavailable] * len(keys[i])
            return
        cells[i] = await read_windows(cast("TileStore", backend), plan, keys[i], now_us)

    if not windowed:  # the usual case: no task to gather
        await read_stored()
    else:
        reads = [read_windowed(i) for i in windowed] + ([read_stored()] if stored else [])
        await asyncio.gather(*reads)
    if partial:
        raise _Partial(cells, partial[0])
    if backend is None and windowed:  # their tiles live on the backend, whose circuit is open
        raise _Partial(cells, PartialRead("circuit open", [], [], answered=False))
    return cells  # backend None: every key was served from the caches (outcome.asked is False)


def _missed(gw: Gateway, generation: Generation, name: str, outcome: BackendOutcome, started: float) -> None:
    """A read the deadline cut off. A tight deadline is not the backend's fault, nor is an event loop too busy
    to read the reply; a backend that itself kept the request waiting past `breaker_slow_ms` is failing (a
    frozen or black-holed server never answers with an error). See Gateway.blames."""
    outcome.status, outcome.error = Outcome.TIMEOUT, "missed the deadline"
    outcome.ms = (time.perf_counter() - started) * 1000
    if gw.blames(name, "read", started):
        generation.breakers[name].read.failure()
    else:
        generation.breakers[name].read.abandoned()


def _held(
    gw: Gateway,
    generation: Generation,
    name: str,
    plans: list[GroupPlan],
    unique: dict[str, tuple[list[str], list[int] | None]],
    now_us: int,
    outcomes: dict[str, BackendOutcome],
) -> bool:
    """Serve backend `name`'s groups (all with local_cache_ms) from this worker's memory if it holds every key.
    The backend is not asked: its circuit learns nothing (a probe slot `allow` took goes back)."""
    blobs = gw.local_cache.held([(p.group, unique[p.group.entity.join_key][0]) for p in plans])
    if blobs is None:
        return False
    nulls = gw.metrics.null_values
    outcome = outcomes[name]
    outcome.cells = [
        [p.cell(b, now_us, nulls) for b in group_blobs] for p, group_blobs in zip(plans, blobs, strict=True)
    ]
    outcome.asked = False
    outcome.local = (sum(map(len, blobs)), 0, 0)
    generation.breakers[name].read.abandoned()
    return True


def _unique(keys: list[str]) -> tuple[list[str], list[int] | None]:
    """Deduplicated keys, and each row's index into them (None when there were no duplicates)."""
    unique = list(dict.fromkeys(keys))
    if len(unique) == len(keys):
        return keys, None
    at = {k: i for i, k in enumerate(unique)}
    return unique, [at[k] for k in keys]


@dataclass(slots=True)
class Served:
    """A fetch answered, before formatting: per group of the plan, its cells in row order."""

    request: FetchRequest
    plan: Plan
    columns: list[list[Cell]]
    outcomes: dict[str, BackendOutcome]
    n_rows: int
    degraded: bool
    transforms: dict[str, TransformOutcome]  # per on-demand view of the plan (none: no transform asked)

    @property
    def transform_ms(self) -> float:
        return sum(t.ms for t in self.transforms.values())


# A request with less than this (or than a fetch takes now) left of its deadline when it could start is
# refused, not served all defaults.
MIN_READ_S = 0.001


# The usage of fetches that list their features, beside each service's
BY_FEATURES = "(features)"


async def serve(
    gw: Gateway,
    request: FetchRequest,
    groups: Collection[str] | None = None,
    received: float | None = None,
    caller: str | None = None,
) -> Served:
    """Validate against the registry, read every backend under the deadline, count usage.

    `groups`: the feature groups the caller's API key may use (None: all). `received`: when the server received
    the request (time.perf_counter()); the deadline counts from then, so time spent queued counts against it.
    `caller`: the API key's name, for usage per model and key (None: keys are off).
    """
    # On the registry generation it starts on to the end, whatever a reload swaps in meanwhile
    with gw.pinned() as generation:
        return await _serve(gw, generation, request, groups, received, caller)


async def _serve(
    gw: Gateway,
    generation: Generation,
    request: FetchRequest,
    groups: Collection[str] | None,
    received: float | None,
    caller: str | None,
) -> Served:
    limits = gw.limits
    plan = plan_for(gw, request, groups)
    n_rows, keys_by_join = check_entities(request.entities, gw.registry, plan.join_keys, limits)
    context = check_context(request.context, plan, n_rows)
    deadline_ms = request.deadline_ms
    if deadline_ms is None:  # the service's (the model's budget), else the gateway's
        service_ms = plan.service.deadline_ms if plan.service else None
        deadline_ms = limits.default_deadline_ms if service_ms is None else min(service_ms, limits.max_deadline_ms)
    if not 0 < deadline_ms <= limits.max_deadline_ms:
        raise ValidationFailed(f"deadline_ms is between 0 and {limits.max_deadline_ms:g}", field="deadline_ms")

    deadline_s = deadline_ms / 1000
    started = time.perf_counter()
    if received is not None and deadline_s >= MIN_READ_S:  # (a deadline too short for any read is served as asked)
        # What a fetch takes now, once admitted: a request its wait left less than that would be all defaults.
        # At most half the deadline: a worker whose fetches take nearly the whole deadline (or longer) must go on
        # serving some, and so measuring them, not refuse every request that waited at all.
        typical_s = 0.0 if gw.admission is None else min(gw.admission.typical_s, deadline_s / 2)
        needed_s = max(MIN_READ_S, typical_s)
        waited_s = started - received
        deadline_s -= waited_s
        if deadline_s < needed_s and waited_s >= MIN_READ_S:  # (under a millisecond is no queue)
            raise Overloaded(
                f"the request waited {(started - received) * 1000:.0f} ms before it could start, leaving less of "
                f"its {deadline_ms:g} ms deadline than a fetch takes now ({needed_s * 1000:.0f} ms); nothing was "
                "read, retry shortly",
                field="deadline_ms",
            )

    unique = {jk: _unique(keys) for jk, keys in keys_by_join.items()}
    now_us = time.time_ns() // 1000
    outcomes = {name: BackendOutcome() for name, _ in plan.by_backend}
    reads = []
    deadline_at = started + deadline_s
    for name, indexes in plan.by_backend:
        plans = [plan.groups[i] for i in indexes]
        circuit_open = not generation.breakers[name].read.allow()
        if all(p.group.local_cache_ms for p in plans) and _held(gw, generation, name, plans, unique, now_us, outcomes):
            continue  # every key in this worker's memory (app/serving/local_cache.py): no task, nothing asked
        if circuit_open and not any(p.group.cache or p.group.local_cache_ms for p in plans):
            outcome = outcomes[name]
            outcome.status, outcome.error = Outcome.OPEN, "circuit open: the backend failed repeatedly; probing it"
            continue
        keys = [unique[p.group.entity.join_key][0] for p in plans]
        limit_s = generation.read_timeout_s[name]
        limit = limit_s if limit_s < deadline_s else None
        read = _read_backend(
            gw, generation, name, plans, keys, now_us, outcomes[name], limit, deadline_at, circuit_open
        )
        reads.append((name, read))
    if len(reads) == 1:  # one backend: no task to spawn, the deadline cancels this one
        name, read = reads[0]
        try:
            async with asyncio.timeout(deadline_s):
                await read
        except TimeoutError:
            _missed(gw, generation, name, outcomes[name], started)
    elif reads:
        tasks = {name: gw.spawn(read) for name, read in reads}
        try:
            _, pending = await asyncio.wait(tasks.values(), timeout=deadline_s)
        except asyncio.CancelledError:  # our caller gave up (shutdown): the reads must not outlive it
            for name, task in tasks.items():
                if not task.done():
                    task.cancel()
                    generation.breakers[name].read.abandoned()
            raise
        for name, task in tasks.items():
            if task in pending:
                task.cancel()
                _missed(gw, generation, name, outcomes[name], started)

    for name, outcome in outcomes.items():  # before any strict 503, so failures are always counted
        # (a backend wholly served from this worker's memory was not read: no 0 ms read in its latency)
        if outcome.asked or outcome.cache is not None or outcome.status is not Outcome.OK:
            gw.metrics.backend_read(name, outcome.status, outcome.ms)
    degraded = any(o.status is not Outcome.OK for o in outcomes.values())
    if degraded and request.strict:
        failed = {n: o.error for n, o in outcomes.items() if o.status is not Outcome.OK}
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

    served = _count(plan, columns, n_rows)
    transforms: dict[str, TransformOutcome] = {}
    if plan.transforms:
        transforms = run_transforms(gw, plan, columns, context, n_rows)
        degraded = degraded or any(t.status is not Outcome.OK for t in transforms.values())
        for tp, transformed in zip(plan.transforms, columns[len(plan.groups) :], strict=True):
            rows = transforms[tp.view.name].rows
            if rows is not None:  # one status per row for every output: counted in C
                width = len(tp.served)
                served.present += rows.count(PRESENT) * width
                served.missing += rows.count(MISSING) * width
                served.expired += rows.count(EXPIRED) * width
                served.unavailable += rows.count(UNAVAILABLE) * width
                continue
            for cell in transformed:  # an error (all UNAVAILABLE) or values the function left out
                for i in tp.served:
                    served.count(cell.statuses[i])
    served.requests = 1
    gw.metrics.model_usage(BY_FEATURES if plan.service is None else plan.service.name, caller, served)
    return Served(request, plan, columns, outcomes, n_rows, degraded, transforms)


def plan_for(gw: Gateway, request: FetchRequest, groups: Collection[str] | None) -> Plan:
    """The plan of a request's feature list or of its service; `groups` as for serve."""
    if request.service is not None:
        if request.features is not None:
            raise ValidationFailed("give either features or service, not both", field="service")
        service = gw.registry.services.get(request.service)
        if service is None:
            if groups is not None:  # a limited key: an unknown service and one it may not use look alike
                raise Forbidden(f"this API key may not use service {request.service!r}", field="service")
            known = ", ".join(gw.registry.services) or "none"
            raise ValidationFailed(f"unknown service {request.service!r}; services: {known}", field="service")
        plan = gw.service_plan(service)  # cached: the groups it reads are known once
        if groups is not None and not all(gp.group.name in groups for gp in plan.groups):
            raise Forbidden(f"this API key may not use service {request.service!r}", field="service")
        return plan
    if request.features is None:
        raise ValidationFailed("give the features to fetch (a list of refs) or a service", field="features")
    if groups is not None:
        check_feature_groups(request.features, groups, gw.registry.on_demand)
    return gw.plan(request.features)


def _count(plan: Plan, columns: list[list[Cell]], n: int) -> UsageCounts:
    """Feature usage, on the group plan's own counters (the cached plan is bounded; see Gateway.plan); answers
    the stored values served by status, for the caller's model (by rows: a row partly null or partly past a
    service's max_age counts as PRESENT here, as it does per feature)."""
    served = UsageCounts()
    for gp, column in zip(plan.groups, columns, strict=True):
        usage = gp.usage
        usage.requests += 1
        width = gp.served
        # Identity counts, in C. UNAVAILABLE may be some cells only (a backend's PartialRead), so it is counted too.
        unavailable = sum(map(is_, column, repeat(gp.unavailable)))
        if unavailable == n:
            usage.unavailable += n
            served.unavailable += n * width
            continue
        missing = sum(map(is_, column, repeat(gp.missing)))
        expired = sum(map(is_, column, repeat(gp.expired)))
        present = n - missing - expired - unavailable
        usage.present += present
        usage.missing += missing
        usage.expired += expired
        usage.unavailable += unavailable
        served.present += present * width
        served.missing += missing * width
        served.expired += expired * width
        served.unavailable += unavailable * width
    return served
