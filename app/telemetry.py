"""OpenTelemetry: a tracer per app (never the global provider, so apps and tests stay independent).

Spans are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or GATEWAY_OTLP_ENDPOINT) is set, or to
an exporter the caller passes (tests use the in-memory one). With neither, there is no tracer and nothing is
built on the hot path. What a traced request costs, and why, is in app/tracing/ (spans.py, export.py).

Sampling is parent-based: a request that joins a caller's trace is recorded when the caller's was (the
`traceparent` flags), and a new trace is recorded with probability `GATEWAY_TRACE_SAMPLE_RATIO`. The standard
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, when set, replace that setting (the SDK reads them).
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from app.settings import Settings
from app.tracing.export import QueuedExport
from app.tracing.spans import Tracing


def make_tracing(settings: Settings, exporter: SpanExporter | None = None) -> Tracing | None:
    """None when tracing is off: callers skip spans entirely (see Gateway.span)."""
    endpoint = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return None
    # None: the SDK takes OTEL_TRACES_SAMPLER (and its argument) from the environment.
    ratio = None if os.environ.get("OTEL_TRACES_SAMPLER") else settings.trace_sample_ratio
    sampler = None if ratio is None else ParentBased(TraceIdRatioBased(ratio))
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}), sampler=sampler)
    if exporter is not None:
        return Tracing(provider, SimpleSpanProcessor(exporter), ratio)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Without our own setting the exporter reads OTEL_EXPORTER_OTLP_* itself, path included.
    url = f"{settings.otlp_endpoint.rstrip('/')}/v1/traces" if settings.otlp_endpoint else None
    otlp = OTLPSpanExporter(endpoint=url)
    # QueuedExport posts with the exporter's own HTTP client; an SDK without one gets the SDK's batch processor.
    processor = QueuedExport(otlp) if QueuedExport.can_post_with(otlp) else BatchSpanProcessor(otlp)
    return Tracing(provider, processor, ratio)


def traceresponse(span: trace.Span) -> str | None:
    """The W3C Trace Context level 2 `traceresponse` header of a request's span: version, trace id, the span's
    id, flags (01: sampled, so the trace can be looked up). None when there is no trace (tracing off)."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    trace_id, span_id = context.trace_id.to_bytes(16, "big").hex(), context.span_id.to_bytes(8, "big").hex()
    return f"00-{trace_id}-{span_id}-{context.trace_flags:02x}"


class TraceIds(logging.Filter):
    """Gives each log record `trace`: ` trace_id=... span_id=...` of the span current where it was logged (empty
    outside one), so a line logged while serving a request (a failed write, say) leads to its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace = f" trace_id={context.trace_id:032x} span_id={context.span_id:016x}" if context.is_valid else ""
        return True
