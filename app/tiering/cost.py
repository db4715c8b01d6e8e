"""The cost report (issue 14): per group, what it holds on each backend and what that costs a month, against how
much it is used; and recommendations, which are plain facts for a person to act on (nothing here moves or drops
anything).

Bytes are measured by the backends (backends/base.py `Measured`; each backend's `footprints` docstring says what
it counts). Measuring reads every key or row of a group, so each backend's answer is kept `ttl_s` (60 s) and
shared by every report meanwhile; backends are measured concurrently, each under `timeout_s`, and one that fails
or is down is reported with its error while the others answer.

Use comes from the usage counts /v1/usage reports (merged across workers), which start with the gateway: requests
per day are extrapolated from the requests since then (`uptime_seconds` says over how long). Usage is counted per
feature, so a group's requests are those of its most requested feature: a lower bound on the requests that read
the group. Its default rate is the share of its served values that were defaults (MISSING, EXPIRED, UNAVAILABLE).

Monthly cost: bytes / 2^30 * the backend's `cost_per_gb_month` (a GiB held a month), None where it has no price.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from app.errors import describe_error
from app.registry.model import Group, Registry
from app.serving.usage import UsageCounts
from backends.base import FeatureBackend, Footprint, Measured

GIB = 1 << 30
DAY_S = 86_400


class Role(StrEnum):
    """Why a backend holds a group's values."""

    RECORD = "record"  # the group's own backend: its system of record
    CACHE = "cache"  # the hot tier in front of it (copies, kept a ttl)
    MOVE_TARGET = "move_target"  # where `feature-gateway move` is copying it to
    MOVE_SOURCE = "move_source"  # the old copy of a move that cut reads over, still written until it ends


@dataclass(frozen=True, slots=True)
class CostPolicy:
    """When a fact becomes a recommendation."""

    large_bytes: int = 256 << 20  # a group this big on the most expensive backend is worth a cheaper home...
    low_rps: float = 10.0  # ...when it is asked for less often than this


@dataclass(frozen=True, slots=True)
class Measurement:
    """One backend's answer: each group's footprint, or why there is none."""

    footprints: Mapping[str, Footprint]
    measured_at: float  # unix time
    error: str | None = None


@dataclass(slots=True)
class _Kept:
    backend: FeatureBackend  # the object measured: a reloaded registry opens new ones, measured afresh
    groups: tuple[str, ...]
    measurement: Measurement
    until: float  # monotonic


class CostMeter:
    """Measures backends for the cost report and keeps each answer `ttl_s` (an error `error_ttl_s`, so a backend
    back up shows soon); concurrent reports share one measurement in flight."""

    def __init__(
        self,
        *,
        ttl_s: float = 60.0,
        error_ttl_s: float = 10.0,
        timeout_s: float = 10.0,
        budget_s: float = 5.0,
        policy: CostPolicy | None = None,
    ):
        self.ttl_s = ttl_s
        self.error_ttl_s = error_ttl_s
        self.timeout_s = timeout_s  # the most a report waits for a backend
        self.budget_s = budget_s  # what a backend may spend walking its keys (less: it answers within timeout_s)
        self.policy = policy or CostPolicy()
        self._kept: dict[str, _Kept] = {}
        self._running: dict[str, asyncio.Task[Measurement]] = {}

    async def measure(self, backends: Mapping[str, FeatureBackend], registry: Registry) -> dict[str, Measurement]:
        names = list(backends)
        found = await asyncio.gather(*(self._one(n, backends[n], registry.groups_on(n)) for n in names))
        return dict(zip(names, found, strict=True))

    async def _one(self, name: str, backend: FeatureBackend, groups: Sequence[Group]) -> Measurement:
        group_names = tuple(g.name for g in groups)
        kept = self._kept.get(name)
        if (
            kept is not None
            and kept.backend is backend
            and kept.groups == group_names
            and time.monotonic() < kept.until
        ):
            return kept.measurement
        task = self._running.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(name, backend, groups), name=f"measure:{name}")
            self._running[name] = task
            task.add_done_callback(lambda _: self._running.pop(name, None))
        # Shielded: a report whose client went away leaves the measurement to finish for the next one
        return await asyncio.shield(task)

    async def _run(self, name: str, backend: FeatureBackend, groups: Sequence[Group]) -> Measurement:
        if not groups:
            measurement = Measurement({}, time.time())
        elif not isinstance(backend, Measured):
            measurement = Measurement({}, time.time(), f"a {backend.type} backend cannot measure what it holds")
        else:
            try:
                async with asyncio.timeout(self.timeout_s):
                    footprints = await backend.footprints(groups, min(self.budget_s, self.timeout_s / 2))
                measurement = Measurement(footprints, time.time())
            except TimeoutError:
                measurement = Measurement({}, time.time(), f"measuring took longer than {self.timeout_s:g} s")
            except Exception as exc:
                measurement = Measurement({}, time.time(), describe_error(exc))
        ttl = self.ttl_s if measurement.error is None else self.error_ttl_s
        self._kept[name] = _Kept(backend, tuple(g.name for g in groups), measurement, time.monotonic() + ttl)
        return measurement

    async def aclose(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# -- the report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holding:
    """One group on one backend."""

    role: Role
    keys: int | None  # None: not measured (see the backend's error)
    bytes: int | None
    gib: float | None
    monthly_cost: float | None  # None: not measured, or the backend has no price
    sampled: bool  # bytes extrapolated from a sample of its keys
    keys_estimated: bool  # keys extrapolated too (a walk cut short)


@dataclass(frozen=True, slots=True)
class GroupCost:
    backends: dict[str, Holding]  # its system of record first, then its cache, then a move target
    monthly_cost: float | None  # over its backends with a price; None when none has one
    requests: int  # since the gateway started: those of its most requested feature
    requests_per_day: float | None  # extrapolated from them; None before a second has passed
    values: int  # values served (one per feature per entity row)
    statuses: dict[str, int]
    default_rate: float | None  # share of values served as defaults; None when none was served
    never_requested: list[str]  # its features no request has asked for since the gateway started


@dataclass(frozen=True, slots=True)
class BackendCost:
    type: str
    cost_per_gb_month: float | None
    keys: int | None  # summed over the groups reported on it; None when it could not be measured
    bytes: int | None
    gib: float | None
    monthly_cost: float | None
    measured_at: float | None  # unix time of the measurement shown (kept up to the meter's ttl)
    error: str | None


@dataclass(frozen=True, slots=True)
class CostReport:
    since: str  # RFC 3339: usage is counted from here
    uptime_seconds: float
    backends: dict[str, BackendCost]
    groups: dict[str, GroupCost]
    monthly_cost: float | None  # every priced backend's cost of the groups reported
    recommendations: list[str]
    notes: list[str] = field(default_factory=list)


def roles(group: Group) -> dict[str, Role]:
    """The backends holding a group's values, and why."""
    out = {group.backend: Role.RECORD}
    if group.cache is not None:
        out.setdefault(group.cache.backend, Role.CACHE)
    if group.moving_to is not None:
        out.setdefault(group.moving_to, Role.MOVE_TARGET)
    if group.moving_from is not None:
        out.setdefault(group.moving_from, Role.MOVE_SOURCE)
    return out


def monthly(size: int | None, price: float | None) -> float | None:
    return None if size is None or price is None else round(size / GIB * price, 6)


def cost_report(
    registry: Registry,
    measurements: Mapping[str, Measurement],
    usage: Mapping[tuple[str, int], UsageCounts],
    *,
    started: float,
    now: float,
    groups: Collection[str] | None = None,
    policy: CostPolicy | None = None,
) -> CostReport:
    """The report over `groups` (None: every group), and the backends holding them; `usage` is
    Merged.feature_usage() (per group and feature position), counted since `started` (unix time)."""
    policy = policy or CostPolicy()
    uptime = max(0.0, now - started)
    shown = [g for g in registry.groups.values() if groups is None or g.name in groups]
    group_costs: dict[str, GroupCost] = {}
    for group in shown:
        holdings = {}
        for backend, role in roles(group).items():
            measurement = measurements.get(backend)
            footprint = None if measurement is None else measurement.footprints.get(group.name)
            price = registry.backends[backend].cost_per_gb_month
            if footprint is None:
                holdings[backend] = Holding(role, None, None, None, None, False, False)
                continue
            holdings[backend] = Holding(
                role,
                footprint.keys,
                footprint.bytes,
                round(footprint.bytes / GIB, 6),
                monthly(footprint.bytes, price),
                footprint.sampled,
                footprint.keys_estimated,
            )
        totals = UsageCounts()
        requests = 0
        never = []
        for feature in group.features:
            counts = usage.get((group.name, feature.index)) or UsageCounts()
            totals.add(counts)
            requests = max(requests, counts.requests)
            if counts.requests == 0:
                never.append(feature.name)
        costs = [h.monthly_cost for h in holdings.values() if h.monthly_cost is not None]
        group_costs[group.name] = GroupCost(
            backends=holdings,
            monthly_cost=round(sum(costs), 6) if costs else None,
            requests=requests,
            requests_per_day=round(requests / uptime * DAY_S, 1) if uptime >= 1 else None,
            values=totals.values,
            statuses={str(k): v for k, v in totals.by_status().items()},
            default_rate=totals.default_rate(),
            never_requested=never,
        )
    used = {name for g in shown for name in roles(g)}
    backend_costs: dict[str, BackendCost] = {}
    for name, spec in registry.backends.items():
        if groups is not None and name not in used:
            continue  # a group-limited key sees the backends of its groups only
        measurement = measurements.get(name)
        on_it = [c.backends[name] for c in group_costs.values() if name in c.backends]
        error = "not measured" if measurement is None else measurement.error
        keys = None if error else sum(h.keys or 0 for h in on_it)
        size = None if error else sum(h.bytes or 0 for h in on_it)
        backend_costs[name] = BackendCost(
            type=spec.type,
            cost_per_gb_month=spec.cost_per_gb_month,
            keys=keys,
            bytes=size,
            gib=None if size is None else round(size / GIB, 6),
            monthly_cost=monthly(size, spec.cost_per_gb_month),
            measured_at=None if measurement is None else round(measurement.measured_at, 3),
            error=error,
        )
    priced = [b.monthly_cost for b in backend_costs.values() if b.monthly_cost is not None]
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    report = CostReport(
        since=since,
        uptime_seconds=round(uptime, 1),
        backends=backend_costs,
        groups=group_costs,
        monthly_cost=round(sum(priced), 6) if priced else None,
        recommendations=[],
        notes=[
            f"requests per day are extrapolated from the {round(uptime)} s since the gateway started ({since}); "
            "a group's requests are those of its most requested feature",
            "bytes are the data as each backend measures it (see its docs), not replicas, indexes or overhead",
        ],
    )
    report.recommendations.extend(recommendations(registry, report, shown, uptime, policy))
    return report


def recommendations(
    registry: Registry, report: CostReport, shown: Sequence[Group], uptime: float, policy: CostPolicy
) -> list[str]:
    """Plain facts a person may act on: nothing is done on their account."""
    out: list[str] = []
    prices = {n: b.cost_per_gb_month for n, b in registry.backends.items() if b.cost_per_gb_month is not None}
    dearest = max(prices, key=lambda n: prices[n]) if prices else None
    cheapest = min(prices, key=lambda n: prices[n]) if prices else None
    for group in shown:
        cost = report.groups[group.name]
        record = cost.backends[group.backend]
        rps = cost.requests / uptime if uptime >= 1 else None
        rate = "no requests yet" if rps is None else fmt_rate(rps)
        if (
            dearest is not None
            and cheapest is not None
            and group.backend == dearest
            and prices[cheapest] < prices[dearest]
            and group.cache is None
            and group.also_written is None
            and group.streaming is None
            and record.bytes is not None
            and record.bytes >= policy.large_bytes
            and (rps is None or rps < policy.low_rps)
        ):
            out.append(
                f"{group.name}: {fmt_bytes(record.bytes)} on {dearest} ({fmt_money(record.monthly_cost)}/month), "
                f"{rate}, p99 need {p99_need(registry, group.name)}: candidate for {cheapest} + cache "
                f"(there {fmt_money(monthly(record.bytes, prices[cheapest]))}/month before the cache)"
            )
        if group.cache is not None:
            cached = cost.backends.get(group.cache.backend)
            if cached is not None and cached.keys is not None and record.keys is not None:
                share = f"{cached.keys / record.keys:.1%} of its keys" if record.keys else "no keys to cache"
                default = "no values served yet" if cost.default_rate is None else f"{cost.default_rate:.1%}"
                out.append(
                    f"{group.name}: cached on {group.cache.backend} (ttl {fmt_duration(group.cache.ttl_s)}): "
                    f"{held(cached.keys, cached.bytes, cached.monthly_cost)} there against "
                    f"{held(record.keys, record.bytes, record.monthly_cost)} on {group.backend}: {share}; {rate}, "
                    f"default rate {default}"
                )
        if group.moving_to is not None:
            target = cost.backends.get(group.moving_to)
            if target is not None and target.keys is not None and record.keys is not None:
                out.append(
                    f"{group.name}: moving from {group.backend} to {group.moving_to}: {target.keys:,} of "
                    f"{record.keys:,} keys there so far"
                )
        read_by_services = {
            ref.partition(":")[2]
            for service in registry.services.values()
            for ref in registry.service_reads(service)
            if ref.partition(":")[0] == group.name
        }
        droppable = [name for name in cost.never_requested if name not in read_by_services]
        if droppable and len(droppable) == len(group.features):
            where = "; ".join(
                f"{held(h.keys, h.bytes, h.monthly_cost)} on {b}"
                for b, h in cost.backends.items()
                if h.keys is not None
            )
            out.append(
                f"{group.name}: no feature requested since {report.since} and none read by a service"
                + (f" ({where})" if where else "")
                + ": candidate to drop"
            )
        elif droppable:
            out.append(
                f"{group.name}: {len(droppable)} of {len(group.features)} features never requested since "
                f"{report.since} and read by no service ({', '.join(droppable)}): candidates to drop"
            )
    return out


def p99_need(registry: Registry, group: str) -> str:
    """The tightest deadline of the services reading the group, the only latency need the registry states."""
    needs = [
        (s.deadline_ms, s.name)
        for s in registry.services.values()
        if s.deadline_ms is not None and group in registry.service_groups(s)
    ]
    if not needs:
        return "unknown"
    ms, service = min(needs)
    return f"{ms:g} ms ({service})"


# -- formatting, shared with the CLI's table ----------------------------------------------------------------


def fmt_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def fmt_money(amount: float | None) -> str:
    """An amount in the registry's currency (cost_per_gb_month's, which it does not name); "-" without a price.
    Four decimals under 1: a test's or a small group's cost is not rounded away to nothing."""
    if amount is None:
        return "-"
    return f"{amount:,.2f}" if amount >= 1 else f"{amount:.4f}"


def held(keys: int | None, size: int | None, cost: float | None) -> str:
    """`2,000 keys, 102.4 KiB (0.0001/month)`, the cost left out without a price."""
    text = f"{keys:,} keys, {fmt_bytes(size)}" if keys is not None else "not measured"
    return text if cost is None else f"{text} ({fmt_money(cost)}/month)"


def fmt_rate(per_second: float) -> str:
    if per_second >= 1:
        return f"{per_second:,.3g} req/s"
    return f"{per_second * DAY_S:,.3g} req/day"


def fmt_duration(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def as_json(report: CostReport) -> dict[str, Any]:
    """The report as GET /v1/cost answers it (routers/models.py CostReport documents it)."""
    return asdict(report)
