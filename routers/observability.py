"""GET /metrics (Prometheus), GET /v1/usage (which features are read, and how often they are defaults),
and the ASGI middleware that times every request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import check_every_group
from app.metrics import LATENCY_BUCKETS_S, Histogram, Merged
from app.resilience.breaker import CircuitState
from app.serving.gateway import Gateway
from app.serving.usage import UsageCounts
from app.streams.report import consumer_latency
from app.tracing.spans import SPAN_COUNTS
from routers.deps import GatewayDep, ReadKey
from routers.models import AUTH_RESPONSES, UsageReport

router = APIRouter()
PREFIX = "feature_gateway"


def documented_paths(routers: Iterable[APIRouter]) -> frozenset[str]:
    """The paths of the routes (the spec's paths, and the status page's), and the docs."""
    paths = {route.path for router in routers for route in router.routes if isinstance(route, APIRoute)}
    return frozenset({*paths, "/", "/docs", "/openapi.json"})


class RequestMetrics:
    """Counts and times every HTTP request by route (unknown paths share one label: no cardinality blow-up):
    the paths in the app's `state.route_labels` (documented_paths)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        trace_id = None

        async def send_status(message: Message) -> None:
            nonlocal status, trace_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    # A recorded trace (flags 01) is the latency's exemplar: `00-<trace id>-<span id>-01`
                    if name == b"traceresponse" and value.endswith(b"-01"):
                        trace_id = value[3:35].decode()
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            gateway: Gateway | None = getattr(scope["app"].state, "gateway", None)
            if gateway is not None:
                path = scope["path"]
                gateway.metrics.request(
                    path if path in scope["app"].state.route_labels else "other",
                    scope["method"],
                    status,
                    time.perf_counter() - started,
                    trace_id,
                )


def _labels(**labels: Any) -> str:
    text = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items()
    )
    return "{" + text + "}"


def _histogram(lines: list[str], name: str, histogram: Histogram, openmetrics: bool = False, **labels: Any) -> None:
    """Its bucket, sum and count lines; in OpenMetrics, a bucket holding a traced observation carries it as an
    exemplar (`# {trace_id="..."} seconds timestamp`), and bounds are written as canonical floats."""
    cumulative = 0
    for i, (bound, count) in enumerate(zip((*LATENCY_BUCKETS_S, float("inf")), histogram.counts, strict=True)):
        cumulative += count
        le = "+Inf" if bound == float("inf") else (repr(bound) if openmetrics else f"{bound:g}")
        line = f"{name}_bucket{_labels(**labels, le=le)} {cumulative}"
        exemplar = histogram.exemplars.get(i) if openmetrics else None
        if exemplar is not None:
            trace_id, seconds, at = exemplar
            line += f' # {{trace_id="{trace_id}"}} {seconds:.6f} {at:.3f}'
        lines.append(line)
    lines.append(f"{name}_sum{_labels(**labels)} {histogram.sum:.6f}")
    lines.append(f"{name}_count{_labels(**labels)} {cumulative}")


def render_prometheus(gateway: Gateway, merged: Merged, openmetrics: bool = False) -> str:
    """The Prometheus text format, or OpenMetrics 1.0 (with exemplars) when the scraper asked for it."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str) -> str:
        full = f"{PREFIX}_{name}"
        # OpenMetrics names a counter's family without the `_total` its samples carry.
        named = full.removesuffix("_total") if openmetrics and kind == "counter" else full
        lines.append(f"# HELP {named} {text}")
        lines.append(f"# TYPE {named} {kind}")
        return full

    name = family("http_requests_total", "counter", "HTTP requests by route, method and status code.")
    for (route, method, status), count in sorted(merged.requests.items()):
        lines.append(f"{name}{_labels(route=route, method=method, status=status)} {count}")
    name = family("http_request_duration_seconds", "histogram", "HTTP request latency by route.")
    for route, histogram in sorted(merged.request_latency.items()):
        _histogram(lines, name, histogram, openmetrics, route=route)
    name = family("backend_read_duration_seconds", "histogram", "Backend read latency (fetch path).")
    for backend, histogram in sorted(merged.backend_latency.items()):
        _histogram(lines, name, histogram, backend=backend)
    name = family("backend_reads_total", "counter", "Backend reads by outcome: ok, error, timeout, open (skipped).")
    for (backend, outcome), count in sorted(merged.backend_outcomes.items()):
        lines.append(f"{name}{_labels(backend=backend, outcome=outcome)} {count}")
    name = family("backend_circuit_state", "gauge", "1 for the state each backend's read and write circuits are in.")
    for backend, circuits in gateway.breakers.items():
        for direction, breaker in zip(circuits._fields, circuits, strict=True):
            for state in CircuitState:
                labels = _labels(backend=backend, direction=direction, state=state)
                lines.append(f"{name}{labels} {int(breaker.state == state)}")
    name = family("event_loop_lag_seconds", "histogram", "How late the event loop woke a timer (CPU starvation).")
    _histogram(lines, name, merged.loop_lag)
    name = family("admission_limit", "gauge", "Adaptive in-flight limit, summed over workers (0: admission off).")
    lines.append(f"{name} {int(sum(w['limit'] for w in merged.loads))}")
    name = family("admission_inflight", "gauge", "Requests being served, summed over workers.")
    lines.append(f"{name} {int(sum(w['inflight'] for w in merged.loads))}")
    name = family("requests_shed_total", "counter", "Requests refused with 503 overload, by work (read, write).")
    for work in ("read", "write"):
        lines.append(f"{name}{_labels(work=work)} {int(sum(w[f'shed_{work}s'] for w in merged.loads))}")
    name = family(
        "spans_total",
        "counter",
        "Spans of recorded requests: exported, dropped (export queue full: requests never wait for tracing), "
        "failed (the collector did not take them).",
    )
    for outcome in SPAN_COUNTS:
        lines.append(f"{name}{_labels(outcome=outcome)} {int(sum(w.get(f'spans_{outcome}', 0) for w in merged.loads))}")
    # Each family's samples together, as OpenMetrics requires (its parser takes a family seen twice for a clash).
    usage = merged.feature_usage()
    groups = gateway.registry.groups
    features = []
    for (group, position), counts in sorted(usage.items()):
        known = groups[group].by_index.get(position) if group in groups else None
        features.append((group, known.name if known is not None else f"#{position}", counts))  # #n: older registry
    requested = family("feature_requests_total", "counter", "Fetch requests that asked for each feature.")
    for group, feature, counts in features:
        lines.append(f"{requested}{_labels(group=group, feature=feature)} {counts.requests}")
    served = family("feature_values_total", "counter", "Values served per feature by status (non-PRESENT = default).")
    for group, feature, counts in features:
        for value_status, count in counts.by_status().items():
            lines.append(f"{served}{_labels(group=group, feature=feature, status=value_status)} {count}")
    models = sorted(merged.models.items())
    requested = family(
        "model_requests_total",
        "counter",
        "Fetch requests per feature service (`(features)`: by feature list) and API key (empty: keys are off).",
    )
    for (service, caller), counts in models:
        lines.append(f"{requested}{_labels(service=service, key=caller)} {counts.requests}")
    served = family("model_values_total", "counter", "Values served per feature service and API key, by status.")
    for (service, caller), counts in models:
        for value_status, count in counts.by_status().items():
            lines.append(f"{served}{_labels(service=service, key=caller, status=value_status)} {count}")
    _stream_families(gateway, merged, family, lines)
    _cache_families(merged, family, lines)
    _local_cache_families(gateway, merged, family, lines)
    _write_families(merged, family, lines)
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


# The cache tier's counters (app/tiering/cache.py), by family: the event names its CacheTier counts
CACHE_FAMILIES = {
    "cache_lookups_total": (
        "Keys of cached groups looked up: hit, miss (read from the system of record), bypassed (the cache's "
        "circuit open), error (the cache failed: read from the system of record).",
        {"hit": "hit", "miss": "miss", "bypassed": "bypassed", "error": "error"},
    ),
    "cache_promotions_total": (
        "Missed keys copied into the cache in the background: written, stale (a newer copy was there), dropped "
        "(the queue was full), failed (the cache did not take them).",
        {"promoted": "written", "promoted_stale": "stale", "promotion_dropped": "dropped", "promoted_failed": "failed"},
    ),
    "cache_writes_total": (
        "Written rows copied into the cache: written, stale, failed (held dirty: read from the system of record "
        "and written again until taken), settled (a dirty row taken on a retry).",
        {"written": "written", "written_stale": "stale", "written_failed": "failed", "settled": "settled"},
    ),
}


def _cache_families(merged: Merged, family: Callable[[str, str, str], str], lines: list[str]) -> None:
    if not merged.cache:
        return
    for name, (text, events) in CACHE_FAMILIES.items():
        full = family(name, "counter", text)
        for (group, event), count in sorted(merged.cache.items()):
            if event in events:
                lines.append(f"{full}{_labels(group=group, result=events[event])} {count}")


def _write_families(merged: Merged, family: Callable[[str, str, str], str], lines: list[str]) -> None:
    """Rows that writes and loads put in each group, by writer (the loaders sharing GATEWAY_METRICS_DIR too)."""
    name = family(
        "rows_written_total",
        "counter",
        "Rows written to a group, by writer (api, feast, materialize, watch, spark) and outcome: written, "
        "skipped_stale (older than the stored row), rejected (a loader's bad row).",
    )
    for (group, via), counts in sorted(merged.writes.items()):
        for outcome, count in zip(("written", "skipped_stale", "rejected"), counts, strict=False):
            lines.append(f"{name}{_labels(group=group, via=via, outcome=outcome)} {int(count)}")


def _local_cache_families(
    gateway: Gateway, merged: Merged, family: Callable[[str, str, str], str], lines: list[str]
) -> None:
    """The workers' local caches (groups' local_cache_ms, app/serving/local_cache.py), summed over workers."""
    if not merged.local_cache and not any(g.local_cache_ms for g in gateway.registry.groups.values()):
        return
    name = family(
        "local_cache_lookups_total",
        "counter",
        "Keys of groups with local_cache_ms looked up in a worker's memory: hit, miss (read from the backend), "
        "coalesced (waited for the same key's read by another request of the worker).",
    )
    for (group, result), count in sorted(merged.local_cache.items()):
        lines.append(f"{name}{_labels(group=group, result=result)} {count}")
    for gauge, text in (("entries", "Entries held"), ("bytes", "Bytes held (blobs, keys and overhead)")):
        name = family(f"local_cache_{gauge}", "gauge", f"{text} by the workers' local caches, summed over workers.")
        lines.append(f"{name} {int(merged.local_cache_size.get(gauge, 0))}")


def _stream_families(
    gateway: Gateway, merged: Merged, family: Callable[[str, str, str], str], lines: list[str]
) -> None:
    """Freshness per stream (app/streams/report.py). The lag and the consumers' reports are the source's, the same
    in every worker; the HTTP figures are summed over workers."""
    registry, monitor = gateway.registry, gateway.freshness
    if not registry.streams:
        return
    states = {name: state for name, state in monitor.streams.items() if name in registry.streams}
    name = family("stream_lag_seconds", "gauge", "Age of the oldest message at the source not yet stored.")
    for stream, state in sorted(states.items()):
        lines.append(f"{name}{_labels(stream=stream)} {state.lag_seconds():.3f}")
    name = family("stream_lag_events", "gauge", "Messages at the source not yet stored (pending or undelivered).")
    for stream, state in sorted(states.items()):
        if state.lag is not None and state.lag.events is not None:
            lines.append(f"{name}{_labels(stream=stream)} {state.lag.events}")
    name = family("stream_source_up", "gauge", "1 when the last probe of the stream's source answered.")
    for stream, state in sorted(states.items()):
        lines.append(f"{name}{_labels(stream=stream)} {int(state.error is None and state.lag is not None)}")
    name = family("stream_consumers", "gauge", "Consumers that reported in the last 10 seconds.")
    for stream, state in sorted(states.items()):
        lines.append(f"{name}{_labels(stream=stream)} {len(state.live_consumers())}")
    name = family("stream_messages_total", "counter", "Messages consumers stored, or set aside as not events.")
    for stream, state in sorted(states.items()):
        for outcome in ("stored", "dead"):
            total = sum(getattr(r, outcome) for r in state.consumers)
            lines.append(f"{name}{_labels(stream=stream, outcome=outcome)} {total}")
    name = family(
        "stream_event_to_servable_seconds",
        "histogram",
        "From a message's append to the source (via consumer), or a POST's arrival (via http), until servable.",
    )
    for stream, state in sorted(states.items()):
        _histogram(lines, name, consumer_latency(state.consumers), stream=stream, via="consumer")
    for stream, histogram in sorted(merged.ingest_latency.items()):
        _histogram(lines, name, histogram, stream=stream, via="http")
    name = family("stream_http_events_total", "counter", "Events sent over HTTP, by outcome, summed over groups.")
    for (stream, outcome), count in sorted(merged.events.items()):
        lines.append(f"{name}{_labels(stream=stream, outcome=outcome)} {count}")
    name = family("aggregation_group_expired", "gauge", "1 while max_lag serves the group's aggregates EXPIRED.")
    for group in registry.groups.values():
        streaming = group.streaming
        if streaming is not None and streaming.max_lag_s is not None:
            behind = monitor.behind(streaming.stream, streaming.max_lag_s)
            lines.append(f"{name}{_labels(group=group.name)} {int(behind)}")


def usage_report(gateway: Gateway, merged: Merged) -> dict[str, Any]:
    usage = merged.feature_usage()
    groups: dict[str, Any] = {}
    never: list[str] = []
    for group in gateway.registry.groups.values():
        features = {}
        for feature in group.features:
            counts = usage.get((group.name, feature.index)) or UsageCounts()
            if counts.requests == 0:
                never.append(feature.ref)
            features[feature.name] = {
                "requests": counts.requests,
                "values": counts.values,
                "statuses": counts.by_status(),
                "default_rate": counts.default_rate(),
            }
        groups[group.name] = {"backend": group.backend, "features": features, "writes": _writes_of(merged, group.name)}
    registry = gateway.registry
    listed = {ref for service in registry.services.values() for ref in registry.service_reads(service)}
    # Every declared service (asked for or not), then fetches by feature list
    totals: dict[str, UsageCounts] = {name: UsageCounts() for name in registry.services}
    by_key: dict[str, dict[str, UsageCounts]] = {}
    for (service, caller), counts in sorted(merged.models.items()):
        totals.setdefault(service, UsageCounts()).add(counts)
        if caller:
            by_key.setdefault(service, {})[caller] = counts
    services = {
        name: {**_usage_of(total), "keys": {k: _usage_of(c) for k, c in by_key.get(name, {}).items()}}
        for name, total in totals.items()
    }
    return {
        "since": merged_since(gateway),
        "groups": groups,
        "never_requested": never,
        "services": services,
        "unused": [ref for ref in never if ref not in listed],
    }


def _writes_of(merged: Merged, group: str) -> dict[str, Any]:
    """What writes and loads put in the group: rows written, skipped as stale, rejected, and when the last was,
    in all and per writer (api, feast, materialize, watch, spark; a loader counts here when it shares the
    gateway's GATEWAY_METRICS_DIR)."""

    def entry(counts: list[float]) -> dict[str, Any]:
        written, skipped, rejected, last = counts
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last else None
        return {"rows": int(written), "skipped_stale": int(skipped), "rejected": int(rejected), "last_at": at}

    ways = {via: counts for (name, via), counts in sorted(merged.writes.items()) if name == group}
    total = [sum(c[i] for c in ways.values()) for i in range(3)] + [max((c[3] for c in ways.values()), default=0)]
    return {**entry(total), "via": {via: entry(counts) for via, counts in ways.items()}}


def _usage_of(counts: UsageCounts) -> dict[str, Any]:
    return {
        "requests": counts.requests,
        "values": counts.values,
        "statuses": counts.by_status(),
        "default_rate": counts.default_rate(),
    }


def merged_since(gateway: Gateway) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(gateway.metrics.started))


@router.get(
    "/metrics",
    operation_id="metrics",
    tags=["observability"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses=AUTH_RESPONSES,
)
async def metrics(request: Request, gateway: GatewayDep, key: ReadKey) -> PlainTextResponse:
    """Needs the read scope on a key that is not limited to some feature groups (it reports on all of them).
    A scraper that accepts `application/openmetrics-text` gets OpenMetrics, whose latency buckets carry trace-id
    exemplars."""
    if key is not None:
        check_every_group(key.groups, "/metrics")
    openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
    text = render_prometheus(gateway, gateway.metrics.merged(), openmetrics)
    if openmetrics:
        return PlainTextResponse(text, media_type="application/openmetrics-text; version=1.0.0; charset=utf-8")
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get(
    "/v1/usage",
    response_model=UsageReport,
    operation_id="get_usage",
    tags=["observability"],
    summary="Per feature: how often it is requested and how often it is served as a default",
    responses=AUTH_RESPONSES,
)
async def get_usage(gateway: GatewayDep, key: ReadKey) -> dict[str, Any]:
    """A key limited to some feature groups sees only those."""
    report = usage_report(gateway, gateway.metrics.merged())
    if key is not None and key.groups is not None:
        allowed = key.groups
        report["groups"] = {name: g for name, g in report["groups"].items() if name in allowed}
        report["never_requested"] = [r for r in report["never_requested"] if r.partition(":")[0] in allowed]
        report["unused"] = [r for r in report["unused"] if r.partition(":")[0] in allowed]
        registry = gateway.registry
        report["services"] = {
            name: entry | {"keys": {k: v for k, v in entry["keys"].items() if k == key.name}}  # not other keys'
            for name, entry in report["services"].items()
            if name in registry.services and registry.service_groups(registry.services[name]) <= allowed
        }
    return report
