"""Spans leave the gateway as OTLP/HTTP protobuf a collector decodes: our encoder writes what the SDK's encoder
writes, a real receiver gets the caller's trace with the right parents, and a full export queue drops spans
(and counts them) rather than make a request wait."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from app.tracing.encode import Encoder
from app.tracing.export import QueuedExport
from app.tracing.spans import Tracing
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
FETCH = {"entities": {"consumer_id": [1, 2]}, "features": ["live:orders_7d", "history:lifetime_orders"]}

# Every kind of attribute value OTLP has, at its edges
VALUES: list[Any] = [
    "",
    "plain",
    "ünïcødé ✓",
    True,
    False,
    0,
    1,
    -1,
    127,
    128,
    2**63 - 1,
    -(2**63),
    0.0,
    -2.5,
    1e308,
    float("inf"),
    float("-inf"),
    ["a", "b"],
    [1, -2, 2**40],
    [1.5, -0.0],
    [True, False],
    [],
    b"\x00\xffbytes",
]


def _sdk_spans() -> tuple[ReadableSpan, ...]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "fg", "deployment": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("feature-gateway", "1.2.3")
    remote = SpanContext(
        int(CALLER_TRACE, 16),
        int(CALLER_SPAN, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=trace.TraceState([("vendor", "x"), ("other", "y=1")]),
    )
    with tracer.start_as_current_span(
        "POST /v1/features/fetch",
        context=trace.set_span_in_context(trace.NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
    ) as request:
        for i, value in enumerate(VALUES):
            request.set_attribute(f"value.{i}", value)
        linked = SpanContext(0x1234, 0x5678, is_remote=False)
        with tracer.start_as_current_span("read hot", links=[Link(linked, {"why": "retry", "n": 2})]) as read:
            read.add_event("first byte", {"bytes": 512})
            try:
                raise TimeoutError("backend timeout")
            except TimeoutError as exc:
                read.record_exception(exc)
            read.set_status(Status(StatusCode.ERROR, "TimeoutError"))
        with tracer.start_as_current_span("ok", kind=SpanKind.CLIENT) as ok:
            ok.set_status(Status(StatusCode.OK))
    with tracer.start_as_current_span("a root of its own", kind=SpanKind.CONSUMER):
        pass
    return exporter.get_finished_spans()


def _ours() -> list[ReadableSpan]:
    """Spans made by app.tracing.spans (what the gateway exports), under a recorded request span."""
    spans: list[ReadableSpan] = []

    class Keep(SimpleSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            spans.append(span)

    tracing = Tracing(TracerProvider(resource=Resource.create({"service.name": "fg"})), Keep(InMemorySpanExporter()))
    sampled = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=x"}

    def write() -> None:
        with tracing.server_span("POST /v1/features/write", sampled) as request:
            request.set_attribute("degraded", False)
            backend = tracing.backend_span("write hot")
            assert backend is not None
            with backend:
                backend.set_attribute("feature.groups", ["live", "embed"])
                backend.set_attribute("feature.keys", 1000)
            raise ValueError("a bad row")  # recorded on the request span as it leaves

    with pytest.raises(ValueError, match="a bad row"):
        write()
    return spans


@pytest.mark.parametrize("make", [_sdk_spans, _ours], ids=["sdk spans", "gateway spans"])
def test_the_encoder_writes_what_the_sdk_encoder_writes(make: Any) -> None:
    spans = make()
    ours = ExportTraceServiceRequest.FromString(Encoder().request(spans))
    assert ours == encode_spans(spans)
    assert sum(len(s.spans) for r in ours.resource_spans for s in r.scope_spans) == len(spans)


def test_the_encoder_caches_attributes_without_mixing_up_equal_values() -> None:
    """1 == True == 1.0 in Python, and all three hash alike: the cache must keep them apart."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for value in (1, True, 1.0, 1, True, 1.0):
        with tracer.start_as_current_span("s") as span:
            span.set_attribute("x", value)
    spans = exporter.get_finished_spans()
    encoder = Encoder()
    for span in spans:  # one at a time: each request sees the others' cached encodings
        assert ExportTraceServiceRequest.FromString(encoder.request([span])) == encode_spans([span])


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps every decoded export; `hold` blocks answers until set."""

    exports: list[ExportTraceServiceRequest] = []
    posts: list[tuple[str, str]] = []  # path and content type of each
    hold = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.posts.append((self.path, self.headers["content-type"]))
        self.exports.append(ExportTraceServiceRequest.FromString(body))
        self.hold.wait(30)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Receiver.exports = []
    _Receiver.posts = []
    _Receiver.hold.set()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        _Receiver.hold.set()
        server.shutdown()
        server.server_close()


def _received() -> list[Any]:
    return [
        span for export in _Receiver.exports for r in export.resource_spans for s in r.scope_spans for span in s.spans
    ]


async def test_a_receiver_gets_the_gateways_spans_under_the_callers_trace(
    gateway: GatewayFactory, names: Names, receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms, not the default 5 s
    registry = names.registry(names.backend("redis"), names.backend("cockroach"))
    unsampled_trace = "0af7651916cd43dd8448eb211c80319c"
    async with gateway(registry, otlp_endpoint=receiver) as client:
        sampled = await client.post(
            "/v1/features/fetch", json=FETCH, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        unsampled = await client.post(
            "/v1/features/fetch", json=FETCH, headers={"traceparent": f"00-{unsampled_trace}-{CALLER_SPAN}-00"}
        )
        assert sampled.status_code == unsampled.status_code == 200
        deadline = time.monotonic() + 20
        exported = 'feature_gateway_spans_total{outcome="exported"} 3'
        # Polled: the count is the export thread's, which nothing here can await
        while exported not in (metrics := (await client.get("/metrics")).text) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert set(_Receiver.posts) == {("/v1/traces", "application/x-protobuf")}
    spans = _received()
    assert {s.trace_id.hex() for s in spans} == {CALLER_TRACE}  # the unsampled request exported nothing
    request = next(s for s in spans if s.name == "POST /v1/features/fetch")
    assert request.parent_span_id.hex() == CALLER_SPAN
    assert request.kind == PbSpan.SPAN_KIND_SERVER
    assert request.flags == 0x300  # the parent's is_remote is known (0x100) and true (0x200)
    reads = {s.name: s for s in spans if s.name.startswith("read ")}
    assert set(reads) == {"read hot", "read bulk"}
    for read in reads.values():
        assert read.parent_span_id == request.span_id
        assert read.start_time_unix_nano >= request.start_time_unix_nano
        assert read.end_time_unix_nano <= request.end_time_unix_nano
        attributes = {a.key: a.value for a in read.attributes}
        assert attributes["feature.keys"].int_value == 2
        assert attributes["outcome"].string_value == "ok"
    assert exported in metrics
    assert 'feature_gateway_spans_total{outcome="dropped"} 0' in metrics


def _span(tracing: Tracing, name: str) -> None:
    with tracing.server_span(name, {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}):
        pass


def test_a_full_export_queue_drops_and_counts_rather_than_wait(receiver: str) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=f"{receiver}/v1/traces")
    processor = QueuedExport(exporter, {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"})
    tracing = Tracing(TracerProvider(), processor, ratio=1.0)
    _Receiver.hold.clear()  # the collector takes the first batch and does not answer
    try:
        _span(tracing, "first")
        _span(tracing, "second")  # a full batch: the thread takes both and posts them
        deadline = time.monotonic() + 20
        while len(_Receiver.exports) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(_Receiver.exports) == 1
        for i in range(10):  # while that post hangs: four fit in the queue, six are dropped
            _span(tracing, f"later {i}")
        assert processor.dropped == 6
        assert tracing.counts() == {"exported": 0, "dropped": 6, "failed": 0}
    finally:
        _Receiver.hold.set()
    assert processor.force_flush(20_000)
    assert tracing.counts() == {"exported": 6, "dropped": 6, "failed": 0}
    names = [s.name for s in _received()]
    assert names == ["first", "second", "later 0", "later 1", "later 2", "later 3"]
    tracing.shutdown()
