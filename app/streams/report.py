"""Each stream's freshness in one document, for `/v1/status` (and its page) and `/metrics`: the consumers' lag
at the source, their reports, the event-to-servable latency by the way events came in (a consumer, or
`POST /v1/events`), and which aggregation groups `max_lag` is turning EXPIRED right now."""

from __future__ import annotations

import time
from typing import Any

from app.metrics import LATENCY_BUCKETS_S, Histogram, Merged
from app.registry.model import Registry
from app.streams.freshness import FreshnessMonitor, StreamFreshness
from app.streams.ingest import aggregation_groups
from app.streams.sources import ConsumerReport


def consumer_latency(reports: list[ConsumerReport]) -> Histogram:
    """Every consumer's event-to-servable latencies together."""
    histogram = Histogram()
    for report in reports:
        if len(report.latency) == len(LATENCY_BUCKETS_S) + 1:  # (a report of another bucket layout is skipped)
            histogram.add(report.latency, report.latency_sum)
    return histogram


def _latency(histogram: Histogram) -> dict[str, Any]:
    count = sum(histogram.counts)

    def ms(q: float) -> float | None:
        bound = histogram.quantile(q)
        return None if bound is None or bound == float("inf") else bound * 1000

    return {
        "count": count,
        "mean_ms": round(histogram.sum / count * 1000, 3) if count else None,
        # The upper bound of the bucket holding it (buckets of LATENCY_BUCKETS_S); None past the last bucket
        "p50_ms_at_most": ms(0.5),
        "p99_ms_at_most": ms(0.99),
    }


def streams_report(registry: Registry, monitor: FreshnessMonitor, merged: Merged) -> dict[str, Any]:
    now = time.time()
    streams: dict[str, Any] = {}
    for name in registry.streams:
        state: StreamFreshness | None = monitor.streams.get(name)
        groups = [
            {
                "name": g.name,
                "max_lag_seconds": g.streaming.max_lag_s,
                "expired": g.streaming.max_lag_s is not None and monitor.behind(name, g.streaming.max_lag_s),
            }
            for g in aggregation_groups(registry, name)
            if g.streaming is not None
        ]
        http = merged.ingest_latency.get(name) or Histogram()
        entry: dict[str, Any] = {
            "source": None if state is None else state.source,
            "lag_events": None if state is None or state.lag is None else state.lag.events,
            "lag_seconds": None if state is None else round(state.lag_seconds(), 3),
            "source_error": None if state is None else state.error,
            "consumers": [],
            "event_to_servable": {"http": _latency(http)},
            "http_events": {o: merged.events.get((name, o), 0) for o in ("accepted", "duplicate", "late")},
            "groups": groups,
        }
        if state is not None:
            entry["consumers"] = [
                {
                    "name": r.name,
                    "seconds_since_report": round(max(0.0, now - r.at), 1),
                    "stored": r.stored,
                    "dead": r.dead,
                }
                for r in sorted(state.consumers, key=lambda r: r.name)
            ]
            entry["live_consumers"] = len(state.live_consumers(now))
            entry["event_to_servable"]["consumer"] = _latency(consumer_latency(state.consumers))
        streams[name] = entry
    return streams
