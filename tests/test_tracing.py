"""One span per backend read under the request span, with what it did; a parseable Server-Timing; the caller's
trace joined (W3C traceparent) and named back (traceresponse); parent-based ratio sampling."""

from __future__ import annotations

import logging
import re

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.clients import live_row, stamp, write
from tests.support.faults import closed_backend
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

TIMING = re.compile(r"^[A-Za-z0-9_]+;dur=\d+(\.\d+)?$")


async def test_a_span_per_backend_under_the_request_span(gateway: GatewayFactory, names: Names) -> None:
    from datetime import timedelta

    exporter = InMemorySpanExporter()
    registry = names.registry(names.backend("redis"), names.backend("cockroach"))
    async with gateway(registry, exporter=exporter) as client:
        await write(client, "live", [live_row(1, 1), live_row(2, 2, at=stamp(-timedelta(minutes=90)))])
        exporter.clear()
        response = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1, 2, 3]}, "features": ["live:orders_7d", "history:lifetime_orders"]},
        )
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["POST /v1/features/fetch"]
    hot, bulk = spans["read hot"], spans["read bulk"]
    for span in (hot, bulk):
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert span.attributes["outcome"] == "ok"
        assert span.attributes["feature.keys"] == 3
    assert hot.attributes["backend.type"] == "redis"
    assert hot.attributes["backend.name"] == "hot"
    assert tuple(hot.attributes["feature.groups"]) == ("live",)
    assert hot.attributes["feature.found"] == 2
    assert hot.attributes["feature.expired"] == 1
    assert bulk.attributes["backend.type"] == "cockroach"
    assert bulk.attributes["feature.found"] == 0

    parts = response.headers["server-timing"].split(", ")
    assert all(TIMING.match(p) for p in parts), parts
    durations = {p.split(";")[0]: float(p.split("=")[1]) for p in parts}
    assert set(durations) == {"hot", "bulk", "total"}
    assert durations["total"] >= max(durations["hot"], durations["bulk"])


async def test_a_failed_backend_span_says_so(gateway: GatewayFactory, names: Names) -> None:
    exporter = InMemorySpanExporter()
    async with gateway(
        names.registry(names.backend("sqlite"), closed_backend("redis", names)), exporter=exporter
    ) as client:
        exporter.clear()
        await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1]}, "features": ["live:orders_7d", "history:lifetime_orders"]},
        )
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["read bulk"].attributes["outcome"] == "error"
    assert spans["read bulk"].status.is_ok is False
    assert spans["read hot"].attributes["outcome"] == "ok"


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACERESPONSE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
FETCH = {"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}


async def test_a_request_joins_the_callers_trace_and_says_which(gateway: GatewayFactory, names: Names) -> None:
    exporter = InMemorySpanExporter()
    async with gateway(names.registry(names.backend("redis")), exporter=exporter) as client:
        exporter.clear()
        headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=x"}
        fetched = await client.post("/v1/features/fetch", json=FETCH, headers=headers)
        written = await client.post("/v1/features/write", json={"group": "live", "rows": [live_row(1, 1)]})
        feast = await client.post(
            "/get-online-features",
            json={"features": ["live:orders_7d"], "entities": {"consumer_id": [1]}},
            headers=headers,
        )
    spans = exporter.get_finished_spans()
    request = next(s for s in spans if s.name == "POST /v1/features/fetch")
    assert f"{request.context.trace_id:032x}" == CALLER_TRACE
    assert request.parent is not None
    assert f"{request.parent.span_id:016x}" == CALLER_SPAN
    assert request.parent.is_remote
    assert request.context.trace_state.get("vendor") == "x"
    read = next(s for s in spans if s.name == "read hot" and s.parent.span_id == request.context.span_id)
    assert read.context.trace_id == request.context.trace_id
    answer = TRACERESPONSE.match(fetched.headers["traceresponse"])
    assert answer is not None
    assert answer.groups() == (CALLER_TRACE, f"{request.context.span_id:016x}", "01")
    # A request with no traceparent starts a trace of its own, and says so too.
    own = TRACERESPONSE.match(written.headers["traceresponse"])
    assert own is not None
    assert own[1] != CALLER_TRACE
    feast_span = next(s for s in spans if s.name == "POST /get-online-features")
    assert f"{feast_span.context.trace_id:032x}" == CALLER_TRACE
    assert TRACERESPONSE.match(feast.headers["traceresponse"])[1] == CALLER_TRACE  # type: ignore[index]


async def test_an_unsampled_caller_gets_no_spans_and_a_ratio_samples_new_traces(
    gateway: GatewayFactory, names: Names
) -> None:
    exporter = InMemorySpanExporter()
    registry = names.registry(names.backend("redis"))
    async with gateway(registry, exporter=exporter) as client:
        exporter.clear()
        unsampled = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"}
        answer = await client.post("/v1/features/fetch", json=FETCH, headers=unsampled)
        assert exporter.get_finished_spans() == ()  # the caller decided: nothing recorded, nothing exported
        assert answer.headers["server-timing"]  # timings are on every answer, sampled or not
        assert TRACERESPONSE.match(answer.headers["traceresponse"]).groups()[::2] == (CALLER_TRACE, "00")  # type: ignore[union-attr]
    exporter = InMemorySpanExporter()  # the first app's shutdown stopped the other one
    async with gateway(registry, exporter=exporter, trace_sample_ratio=0.0) as client:
        exporter.clear()
        for _ in range(20):
            await client.post("/v1/features/fetch", json=FETCH)
        assert exporter.get_finished_spans() == ()  # no new trace sampled at ratio 0
        sampled = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        await client.post("/v1/features/fetch", json=FETCH, headers=sampled)
        assert {s.name for s in exporter.get_finished_spans()} == {"POST /v1/features/fetch", "read hot"}


async def test_otel_traces_sampler_replaces_the_ratio(
    gateway: GatewayFactory, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    async with gateway(names.registry(names.backend("redis")), exporter=exporter, trace_sample_ratio=1.0) as client:
        exporter.clear()
        await client.post("/v1/features/fetch", json=FETCH)
    assert exporter.get_finished_spans() == ()


def test_a_line_logged_inside_a_request_span_carries_its_ids() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from app.cli import _log_config
    from app.telemetry import TraceIds

    record = logging.LogRecord("app", logging.WARNING, __file__, 1, "write failed", None, None)
    with TracerProvider().get_tracer("t").start_as_current_span("POST /v1/features/write") as span:
        TraceIds().filter(record)
    context = span.get_span_context()
    assert record.trace == f" trace_id={context.trace_id:032x} span_id={context.span_id:016x}"
    outside = logging.LogRecord("app", logging.INFO, __file__, 1, "backend hot ready", None, None)
    TraceIds().filter(outside)
    assert outside.trace == ""
    config = _log_config("info")  # what `serve` gives uvicorn: the filter on the handler, the ids in the format
    assert config["handlers"]["default"]["filters"] == ["trace_ids"]
    assert config["formatters"]["default"]["fmt"].endswith("%(trace)s")


async def test_latency_buckets_carry_trace_exemplars_in_openmetrics(gateway: GatewayFactory, names: Names) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    exporter = InMemorySpanExporter()
    async with gateway(names.registry(names.backend("redis")), exporter=exporter) as client:
        sampled = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        await client.post("/v1/features/fetch", json=FETCH, headers=sampled)
        openmetrics = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        prometheus = await client.get("/metrics")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in text_string_to_metric_families(openmetrics.text)}  # the strict parser
    buckets = [
        s
        for s in families["feature_gateway_http_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["route"] == "/v1/features/fetch" and s.exemplar is not None
    ]
    assert len(buckets) == 1  # the one bucket the traced fetch fell in
    assert buckets[0].exemplar.labels == {"trace_id": CALLER_TRACE}
    assert float(buckets[0].labels["le"]) >= buckets[0].exemplar.value
    assert "feature_gateway_http_requests" in families  # a counter's family is named without _total
    assert prometheus.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "trace_id" not in prometheus.text  # the Prometheus text format has no exemplars
