"""One span per backend read under the request span, with what it did; a parseable Server-Timing."""

from __future__ import annotations

import re

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
