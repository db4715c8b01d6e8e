"""The gateway's spans, recorded by a leaner path than the SDK's tracer, exported like any other.

The OpenTelemetry SDK's tracer spent about 45 us on each request span, sampled or not (a generator context
manager, the sampler, a span object with a lock, a locked and validated attribute dictionary, span limits, the
processors' start and end hooks, a read-only copy at the end), and 25 us on each backend span: as much as
serving a small request. The gateway's spans have a known shape (a handful of attributes, rarely an exception),
so `Tracing` decides and records them itself with the SDK's own parts: the propagators (OTEL_PROPAGATORS) to
join the caller's trace, the provider's sampler (ParentBased(TraceIdRatioBased) or OTEL_TRACES_SAMPLER) and id
generator, and at the end one `ReadableSpan` handed to the provider's span processor. An unsampled request gets
a `NonRecordingSpan` with its ids (answered in `traceresponse`, carried by log lines) and builds nothing else.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import Attributes, AttributeValue

from app.tracing.export import QueuedExport

SCOPE = "feature-gateway"
SPAN_COUNTS = {"exported": 0, "dropped": 0, "failed": 0}  # what became of recorded spans (none yet)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_TRACE_ID_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
# The recorded request span being served, or None: what backend_span asks, once per backend call, for less than
# OpenTelemetry's context lookup costs (the OTel context is still attached, for log lines and baggage).
_RECORDING: ContextVar[RecordedSpan | None] = ContextVar("feature_gateway_recording", default=None)


class Tracing:
    """A tracer provider, the one span processor it was given, and the spans the gateway makes with them."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor, ratio: float | None = None) -> None:
        """`ratio`: the provider's sampler is ParentBased(TraceIdRatioBased(ratio)), decided here inline (the
        same rule: a parent's flag, else the trace id's low 64 bits under the ratio's bound), which costs a
        tenth of the SDK's sampler objects on every request; None: ask the provider's sampler."""
        provider.add_span_processor(processor)
        self.provider = provider
        self.processor = processor
        self.sampler = provider.sampler
        self._bound = None if ratio is None else TraceIdRatioBased.get_bound_for_rate(ratio)
        # The headers the configured propagators read: a request with none of them starts a new trace
        self._fields = frozenset(f.lower() for f in propagate.get_global_textmap().fields)
        self._raw_fields = frozenset(f.encode("latin-1") for f in self._fields)
        self.scope = InstrumentationScope(SCOPE)
        self.resource = provider.resource
        self.new_trace_id = provider.id_generator.generate_trace_id
        self.new_span_id = provider.id_generator.generate_span_id

    def server_span(self, name: str, headers: Mapping[str, str]) -> CurrentSpan:
        """The span of a request, current while it is served; a child of the caller's span when its headers
        carry one (W3C `traceparent` and `tracestate`, baggage; whatever OTEL_PROPAGATORS names). Whether it is
        recorded is the sampler's call: parent-based by default, so a caller's decision holds."""
        parent_context: context_api.Context | None = None
        parent = trace.INVALID_SPAN_CONTEXT
        # Starlette's headers keep the raw (lower-cased) names: scanned without decoding each one
        raw: list[tuple[bytes, bytes]] | None = getattr(headers, "raw", None)
        if raw is not None:
            fields = self._raw_fields
            carried = any(name in fields for name, _ in raw)
        else:
            carried = not self._fields.isdisjoint(k.lower() for k in headers)
        if carried:
            parent_context = propagate.extract(headers)
            parent = trace.get_current_span(parent_context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else self.new_trace_id()
        attributes: Attributes = None
        trace_state: TraceState | None
        if self._bound is not None:
            sampled = parent.trace_flags.sampled if parent.is_valid else (trace_id & _TRACE_ID_LIMIT) < self._bound
            recording, trace_state = sampled, parent.trace_state
        else:
            decision = self.sampler.should_sample(parent_context, trace_id, name, SpanKind.SERVER)
            sampled = decision.decision is Decision.RECORD_AND_SAMPLE
            recording = decision.decision is not Decision.DROP
            trace_state, attributes = decision.trace_state, decision.attributes
        context = SpanContext(trace_id, self.new_span_id(), False, _SAMPLED if sampled else _NOT_SAMPLED, trace_state)
        span: trace.Span
        if recording:
            span = RecordedSpan(self, name, context, parent if parent.is_valid else None, SpanKind.SERVER, attributes)
        else:
            span = NonRecordingSpan(context)
        return CurrentSpan(span, parent_context)

    def backend_span(self, name: str) -> RecordedSpan | None:
        """A span for a backend call under the current span, ended by its `with` block; None when the current
        span is not recorded (then nothing is built). Sampling follows the parent's: same trace, same decision."""
        parent = _RECORDING.get()
        if parent is None or not parent.is_recording():
            return None
        parent_context = parent.get_span_context()
        context = SpanContext(
            parent_context.trace_id,
            self.new_span_id(),
            False,
            parent_context.trace_flags,
            parent_context.trace_state,
        )
        return RecordedSpan(self, name, context, parent_context, SpanKind.INTERNAL, None)

    @property
    def threaded(self) -> bool:
        """Does the span processor do its work on a thread of its own (QueuedExport, the SDK's batch one)?"""
        return isinstance(self.processor, QueuedExport | BatchSpanProcessor)

    def counts(self) -> dict[str, int]:
        """Recorded spans exported, dropped (the export queue was full) and failed (the collector did not take
        them), when the processor counts them (QueuedExport does)."""
        processor = self.processor
        return {k: getattr(processor, k, 0) for k in SPAN_COUNTS}

    def shutdown(self) -> None:
        self.provider.shutdown()


class CurrentSpan:
    """Makes a request's span the current one (in the caller's context, so baggage carries on) for a `with`
    block, then ends it; an exception leaving the block is recorded on it, as the SDK's tracer does."""

    __slots__ = ("_context", "_recording", "_span", "_token")

    def __init__(self, span: trace.Span, parent_context: context_api.Context | None) -> None:
        self._span = span
        self._context = parent_context
        self._token: object = None
        self._recording: Token[RecordedSpan | None] | None = None

    def __enter__(self) -> trace.Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span, self._context))
        span = self._span
        self._recording = _RECORDING.set(span if isinstance(span, RecordedSpan) else None)
        return span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._recording is not None:
            _RECORDING.reset(self._recording)
        context_api.detach(self._token)  # type: ignore[arg-type]
        span = self._span
        if exc is not None and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


class RecordedSpan(trace.Span):
    """A recorded span: plain attributes, events and status, one ReadableSpan to the processor at its end. As
    a context manager (backend calls) it ends when the block does, recording an exception that leaves it."""

    __slots__ = (
        "_attributes",
        "_context",
        "_ended",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_start",
        "_status",
        "_tracing",
    )

    def __init__(
        self,
        tracing: Tracing,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Attributes,
    ) -> None:
        self._tracing = tracing
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, AttributeValue] = dict(attributes) if attributes else {}
        self._events: list[Event] = []
        self._status = Status(StatusCode.UNSET)
        self._start = time.time_ns()
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        # Sequences are stored as tuples, as the SDK does: the span may be read after the caller's list changed
        self._attributes[key] = tuple(value) if isinstance(value, list) else value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        self._events.append(Event(name, attributes, timestamp or time.time_ns()))

    def update_name(self, name: str) -> None:
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if self._status.status_code is not StatusCode.OK:  # OK is final (the API's rule)
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The SDK's exception event (semantic conventions: exception.type, .message, .stacktrace, .escaped)."""
        kind = type(exception)
        module = kind.__module__
        recorded: dict[str, AttributeValue] = {
            "exception.type": f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        recorded.update(attributes or {})
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        tracing = self._tracing
        links: Sequence[Link] = ()
        tracing.processor.on_end(
            ReadableSpan(
                self._name,
                self._context,
                self._parent,
                tracing.resource,
                self._attributes,
                self._events,
                links,
                self._kind,
                status=self._status,
                start_time=self._start,
                end_time=end_time or time.time_ns(),
                instrumentation_scope=tracing.scope,
            )
        )

    def __enter__(self) -> RecordedSpan:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, Exception) and self._status.status_code is StatusCode.UNSET:
            self.record_exception(exc)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.end()
