"""OpenTelemetry: a tracer per app (never the global provider, so apps and tests stay independent).

Spans are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or GATEWAY_OTLP_ENDPOINT) is set, or to
an exporter the caller passes (tests use the in-memory one). With neither, the tracer is a no-op and costs
next to nothing on the hot path.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from app.settings import Settings


def make_tracer_provider(settings: Settings, exporter: SpanExporter | None = None) -> TracerProvider | None:
    endpoint = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Without our own setting the exporter reads OTEL_EXPORTER_OTLP_* itself, path included.
        url = f"{settings.otlp_endpoint.rstrip('/')}/v1/traces" if settings.otlp_endpoint else None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return provider


def tracer_for(provider: TracerProvider | None) -> trace.Tracer | None:
    """None when tracing is off: callers skip spans entirely (see Gateway.span)."""
    if provider is None:
        return None
    return provider.get_tracer("feature-gateway")
