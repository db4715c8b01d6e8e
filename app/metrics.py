"""Counters for Prometheus, /v1/usage and the status page, cheap enough for the hot path.

Feature usage is counted per *group read* (identity counts over a request's cells, in C) on the cached plan's
own counters, not per value: a cell's status holds for every feature the request asked of that group, so
per-feature figures are expanded only when someone reads them, and plans leaving the cache are folded into
per-feature totals (memory stays bounded by the registry, whatever feature lists clients send). Values
stored as null inside a PRESENT row are the exception and are counted one by one (they are rare and already
on a slow path).

With several workers each process counts its own; every second it writes a snapshot into a directory they
share (GATEWAY_METRICS_DIR, which `feature-gateway serve` sets up), and a scrape merges them all.
"""

from __future__ import annotations

import contextlib
import os
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec

from app.serving.statuses import Outcome
from app.serving.usage import UsageCounts

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WINDOW_S = 5  # status-page series: one point per 5 s
WINDOW_POINTS = 72  # six minutes
STALE_S = 10  # a snapshot not rewritten for this long (workers rewrite theirs every second) is a dead worker's


class _Group(Protocol):
    @property
    def name(self) -> str: ...


class UsageCounter(Protocol):
    """A group plan's usage counters (app.serving.plan.GroupPlan)."""

    @property
    def group(self) -> _Group: ...
    @property
    def counted(self) -> tuple[int, ...]: ...  # the positions it serves (not those read only for a transform)
    @property
    def usage(self) -> UsageCounts: ...


Exemplar = tuple[str, float, float]  # (trace id, the observed seconds, when: unix seconds)


class Histogram:
    """Latency buckets; each bucket keeps the last traced observation that fell in it (an OpenMetrics exemplar),
    so a slow bucket on a dashboard leads to a trace of a request that was that slow."""

    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0
        self.exemplars: dict[int, Exemplar] = {}  # bucket index -> the latest traced observation in it

    def observe(self, seconds: float, trace_id: str | None = None) -> None:
        bucket = bisect_left(LATENCY_BUCKETS_S, seconds)
        self.counts[bucket] += 1
        self.sum += seconds
        if trace_id is not None:
            self.exemplars[bucket] = (trace_id, seconds, time.time())

    def add(self, counts: list[int], total: float, exemplars: Mapping[int | str, list[Any]] | None = None) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum += total
        for bucket, (trace_id, seconds, at) in (exemplars or {}).items():
            mine = self.exemplars.get(int(bucket))
            if mine is None or mine[2] < at:  # the newest of every worker's
                self.exemplars[int(bucket)] = (trace_id, seconds, at)

    def dump(self) -> list[Any]:
        return [self.counts, self.sum, self.exemplars]

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile (None: no observation; inf: past the last)."""
        return bucket_quantile(self.counts, q)


def bucket_quantile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
        seen += count
        if seen >= rank:
            return bound
    return float("inf")


class Metrics:
    def __init__(self, directory: str | None = None, *, worker: bool = True) -> None:
        self.started = time.time()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (route, method, status)
        self.request_latency: dict[str, Histogram] = defaultdict(Histogram)
        self.backend_latency: dict[str, Histogram] = defaultdict(Histogram)
        self.backend_outcomes: dict[tuple[str, str], int] = defaultdict(int)
        # (group, feature position) -> usage, from evicted plans
        self.features: dict[tuple[str, int], UsageCounts] = defaultdict(UsageCounts)
        # The plans still counting (the gateway's plan cache), expanded when a snapshot is taken
        self.live_plans: Callable[[], Iterable[UsageCounter]] = tuple
        self.null_values: dict[tuple[str, int], int] = defaultdict(int)  # PRESENT rows holding a null value
        # (service or "(features)", API key name or "") -> fetch requests and the values they were served; bounded:
        # services and keys are declared
        self.models: dict[tuple[str, str], UsageCounts] = defaultdict(UsageCounts)
        # backend -> {window start: [count, sum_ms, max_ms]}, for the status page's chart
        self.series: dict[str, dict[int, list[float]]] = defaultdict(dict)
        self.loop_lag = Histogram()  # how late the event loop woke a timer (app/resilience/loop_lag.py)
        # stream -> POST /v1/events: from its arrival until its events were servable; (stream, outcome) -> events
        self.ingest_latency: dict[str, Histogram] = defaultdict(Histogram)
        self.events: dict[tuple[str, str], int] = defaultdict(int)
        # (group, event) -> keys: cache hits, misses, promotions... (app/tiering/cache.py)
        self.cache: dict[tuple[str, str], int] = defaultdict(int)
        # (group, "hit" | "miss" | "coalesced") -> keys, and the entries and bytes held now, of this worker's local
        # cache (app/serving/local_cache.py; the gateway wires both)
        self.local_cache: dict[tuple[str, str], int] = defaultdict(int)
        self.local_cache_size: Callable[[], dict[str, float]] = dict
        # (group, via) -> [rows written, skipped as stale, rejected, unix time of the last]: what writes and loads
        # put in each group. via: "api", "feast", "materialize", "watch"...
        self.writes: dict[tuple[str, str], list[float]] = {}
        # This worker's load now: admission limit, in flight, shed counts, recent lag (Gateway.load)
        self.load: Callable[[], dict[str, float]] = dict
        # False for a loader sharing the folder (app/loading/load.py): its counts merge, it is no worker
        self.worker = worker
        self._dumped = 0.0
        self.directory = Path(directory) if directory else None

    # -- hot path ------------------------------------------------------------------------------------

    def fold(self, counters: Iterable[UsageCounter]) -> None:
        """Add plans' counts into the per-feature totals (a plan leaving the cache)."""
        for counter in counters:
            for position in counter.counted:
                self.features[(counter.group.name, position)].add(counter.usage)

    def feature_totals(self) -> dict[tuple[str, int], UsageCounts]:
        totals: dict[tuple[str, int], UsageCounts] = defaultdict(UsageCounts)
        for key, counts in self.features.items():
            totals[key] = counts.copy()
        for counter in self.live_plans():
            for position in counter.counted:
                totals[(counter.group.name, position)].add(counter.usage)
        return totals

    def model_usage(self, service: str, caller: str | None, served: UsageCounts) -> None:
        self.models[(service, caller or "")].add(served)

    def backend_read(self, backend: str, outcome: Outcome, ms: float) -> None:
        self.backend_outcomes[(backend, outcome.value)] += 1
        if outcome is Outcome.OPEN:
            return
        self.backend_latency[backend].observe(ms / 1000)
        window = int(time.time()) // WINDOW_S * WINDOW_S
        points = self.series[backend]
        point = points.get(window)
        if point is None:
            point = points[window] = [0, 0.0, 0.0]
            if len(points) > WINDOW_POINTS:
                del points[min(points)]
        point[0] += 1
        point[1] += ms
        if ms > point[2]:
            point[2] = ms

    def ingested(self, stream: str, seconds: float, accepted: int, duplicates: int, late: int) -> None:
        self.ingest_latency[stream].observe(seconds)
        self.events[(stream, "accepted")] += accepted
        self.events[(stream, "duplicate")] += duplicates
        self.events[(stream, "late")] += late

    def written(self, group: str, via: str, written: int, skipped_stale: int, rejected: int = 0) -> None:
        counts = self.writes.get((group, via))
        if counts is None:
            counts = self.writes[(group, via)] = [0, 0, 0, 0.0]
        counts[0] += written
        counts[1] += skipped_stale
        counts[2] += rejected
        counts[3] = time.time()

    def request(self, route: str, method: str, status: int, seconds: float, trace_id: str | None = None) -> None:
        self.requests[(route, method, status)] += 1
        self.request_latency[route].observe(seconds, trace_id)

    # -- snapshots shared between workers --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "request_latency": {k: h.dump() for k, h in self.request_latency.items()},
            "backend_latency": {k: [h.counts, h.sum] for k, h in self.backend_latency.items()},
            "backend_outcomes": [[*k, v] for k, v in self.backend_outcomes.items()],
            "usage": [[g, p, counts.to_list()] for (g, p), counts in self.feature_totals().items()],
            "null_values": [[g, p, v] for (g, p), v in self.null_values.items()],
            "models": [[s, k, counts.to_list()] for (s, k), counts in self.models.items()],
            "series": {b: [[w, *point] for w, point in points.items()] for b, points in self.series.items()},
            "loop_lag": [self.loop_lag.counts, self.loop_lag.sum],
            "ingest_latency": {k: [h.counts, h.sum] for k, h in self.ingest_latency.items()},
            "events": [[*k, v] for k, v in self.events.items()],
            "cache": [[*k, v] for k, v in self.cache.items()],
            "local_cache": [[*k, v] for k, v in self.local_cache.items()],
            "writes": [[*k, *v] for k, v in self.writes.items()],
            **({"local_cache_size": self.local_cache_size(), "load": self.load()} if self.worker else {}),
        }

    def dump(self, every_s: float = 0.0) -> None:
        """Write this process's snapshot for the others to merge (at most once per `every_s`)."""
        if self.directory is None or time.monotonic() - self._dumped < every_s:
            return
        self._dumped = time.monotonic()
        target = self.directory / f"{os.getpid()}.json"
        scratch = target.with_suffix(".tmp")
        scratch.write_bytes(msgspec.json.encode(self.snapshot()))
        scratch.replace(target)  # atomic: a reader never sees half a file

    def merged(self) -> Merged:
        snapshots = [self.snapshot()]
        if self.directory is not None:
            own = f"{os.getpid()}.json"
            for path in self.directory.glob("*.json"):
                if path.name != own:
                    with contextlib.suppress(OSError, msgspec.DecodeError):
                        snapshot = msgspec.json.decode(path.read_bytes())
                        if time.time() - path.stat().st_mtime > STALE_S:
                            snapshot.pop("load", None)  # a worker gone: its counts stay, its gauges do not
                            snapshot.pop("local_cache_size", None)
                        snapshots.append(snapshot)
        return Merged(snapshots)


class Merged:
    """The sum of every worker's snapshot."""

    def __init__(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.request_latency: dict[str, Histogram] = defaultdict(Histogram)
        self.backend_latency: dict[str, Histogram] = defaultdict(Histogram)
        self.backend_outcomes: dict[tuple[str, str], int] = defaultdict(int)
        self.usage: dict[tuple[str, int], UsageCounts] = defaultdict(UsageCounts)
        self.null_values: dict[tuple[str, int], int] = defaultdict(int)
        self.models: dict[tuple[str, str], UsageCounts] = defaultdict(UsageCounts)
        self.series: dict[str, dict[int, list[float]]] = defaultdict(dict)
        self.loop_lag = Histogram()
        self.ingest_latency: dict[str, Histogram] = defaultdict(Histogram)
        self.events: dict[tuple[str, str], int] = defaultdict(int)
        self.cache: dict[tuple[str, str], int] = defaultdict(int)
        self.local_cache: dict[tuple[str, str], int] = defaultdict(int)
        self.local_cache_size: dict[str, float] = defaultdict(float)  # summed over the live workers
        self.loads: list[dict[str, float]] = []  # one per worker
        self.writes: dict[tuple[str, str], list[float]] = {}
        for snap in snapshots:
            for route, method, status, count in snap["requests"]:
                self.requests[(route, method, status)] += count
            for target, source in (
                (self.request_latency, snap["request_latency"]),
                (self.backend_latency, snap["backend_latency"]),
            ):
                for name, dumped in source.items():
                    target[name].add(*dumped)
            if "loop_lag" in snap:  # a snapshot written by an older version has neither
                self.loop_lag.add(*snap["loop_lag"])
            for stream, dumped in snap.get("ingest_latency", {}).items():
                self.ingest_latency[stream].add(*dumped)
            for stream, outcome, count in snap.get("events", ()):
                self.events[(stream, outcome)] += count
            for group, event, count in snap.get("cache", ()):
                self.cache[(group, event)] += count
            for group, result, count in snap.get("local_cache", ()):
                self.local_cache[(group, result)] += count
            for gauge, value in snap.get("local_cache_size", {}).items():
                self.local_cache_size[gauge] += value
            if "load" in snap:
                self.loads.append(snap["load"])
            for group, via, written, skipped, rejected, last in snap.get("writes", ()):
                counts = self.writes.setdefault((group, via), [0, 0, 0, 0.0])
                counts[0] += written
                counts[1] += skipped
                counts[2] += rejected
                counts[3] = max(counts[3], last)
            for backend, outcome, count in snap["backend_outcomes"]:
                self.backend_outcomes[(backend, outcome)] += count
            for group, position, counts in snap["usage"]:
                self.usage[(group, position)].add(UsageCounts.from_list(counts))
            for group, position, count in snap["null_values"]:
                self.null_values[(group, position)] += count
            for service, caller, counts in snap.get("models", ()):  # (older snapshots have none)
                self.models[(service, caller)].add(UsageCounts.from_list(counts))
            for backend, points in snap["series"].items():
                for window, count, total, worst in points:
                    point = self.series[backend].setdefault(window, [0, 0.0, 0.0])
                    point[0] += count
                    point[1] += total
                    point[2] = max(point[2], worst)

    def feature_usage(self) -> dict[tuple[str, int], UsageCounts]:
        """(group, feature position) -> usage in values (a null stored in a PRESENT row served as MISSING)."""
        per_feature: dict[tuple[str, int], UsageCounts] = defaultdict(UsageCounts)
        for key, counts in self.usage.items():
            per_feature[key] = counts.copy()
        for (group, position), nulls in self.null_values.items():
            counts = per_feature[(group, position)]
            counts.present -= nulls
            counts.missing += nulls
        return per_feature
