"""OTLP protobuf encoding of finished spans, written out by hand.

The SDK's encoder (opentelemetry-exporter-otlp-proto-common) builds a protobuf object per span, attribute,
value and event in Python, then serializes them: about 35 us per span of the gateway's shape, in the export
thread but holding the GIL, so the event loop waits for it (issue 11's profile: a sixth of the CPU of a traced
server). The wire format is simple enough to write directly: fields in number order, varints, fixed-width
timestamps and length prefixes, which is what the SDK's encoder produces too (tests/test_otlp_encode.py parses
both with the generated protobuf classes and compares). Most attributes of the gateway's spans repeat
(`backend.name=hot`, `outcome=ok`), so an attribute's encoded bytes are cached by key and value.

Message and field numbers: opentelemetry-proto, `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`,
`common/v1/common.proto`, `resource/v1/resource.proto`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from app.storage.layout import varint

_Q = struct.Struct("<Q").pack
_D = struct.Struct("<d").pack
_I = struct.Struct("<I").pack

# Span.flags: the parent's is_remote is known (0x100), and it was remote (0x200); as the SDK's encoder sets them.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_CACHE_LIMIT = 4096  # encoded attributes kept; cleared when full (values such as counts vary without bound)


def _varint(value: int) -> bytes:
    if value < 0:  # int64 on the wire: two's complement in ten bytes
        value += 1 << 64
    return bytes((value,)) if value < 0x80 else varint(value)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) whose tag byte(s) are given."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """common.v1.AnyValue: string 1, bool 2, int 3, double 4, array 5, kvlist 6, bytes 7."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _D(value)
    if isinstance(value, bytes | bytearray):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(k, v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    raise TypeError(f"attribute value of type {type(value).__name__} has no OTLP encoding")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))


class Encoder:
    """Encodes batches of finished spans into an ExportTraceServiceRequest. One per exporting thread: its
    attribute cache is not locked."""

    def __init__(self) -> None:
        self._attributes: dict[tuple[str, type, Any], bytes] = {}
        self._resources: dict[Resource, bytes] = {}
        self._scopes: dict[InstrumentationScope | None, bytes] = {}

    def request(self, spans: Iterable[ReadableSpan]) -> bytes:
        """ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }, spans grouped by resource
        and then by instrumentation scope, in the order they first appear."""
        # Grouped by identity: the spans of one provider share its resource and scope objects, and hashing a
        # Resource serializes its attributes to JSON each time.
        grouped: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes]]]]] = {}
        for span in spans:
            resource = span.resource
            scopes = grouped.get(id(resource))
            if scopes is None:
                scopes = grouped[id(resource)] = (resource, {})
            scope = span.instrumentation_scope or None
            encoded = scopes[1].get(id(scope))
            if encoded is None:
                encoded = scopes[1][id(scope)] = (scope, [])
            encoded[1].append(self.span(span))
        out = []
        for resource, by_scope in grouped.values():
            scope_spans = b"".join(
                # ScopeSpans { scope 1, repeated Span spans 2, schema_url 3 }
                _field(b"\x12", self._scope(scope) + b"".join(_field(b"\x12", s) for s in encoded) + _schema(scope))
                for scope, encoded in by_scope.values()
            )
            # ResourceSpans { resource 1, repeated ScopeSpans scope_spans 2, schema_url 3 }
            out.append(_field(b"\x0a", self._resource(resource) + scope_spans + _schema(resource)))
        return b"".join(out)

    def span(self, span: ReadableSpan) -> bytes:
        """trace.v1.Span."""
        context = span.context
        assert context is not None  # a finished SDK span always has one
        parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
        if context.trace_state:
            parts.append(_field(b"\x1a", _trace_state(context)))
        parent = span.parent
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts += (
            _field(b"\x2a", span.name.encode()),
            b"\x30" + _varint(span.kind.value + 1),  # the SDK's INTERNAL is 0, OTLP's is 1 (0: unspecified)
            b"\x39" + _Q(span.start_time or 0),
            b"\x41" + _Q(span.end_time or 0),
        )
        if span.attributes:
            parts.append(self._attributes_of(b"\x4a", span.attributes))
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            # Event { fixed64 time_unix_nano 1, name 2, repeated attributes 3, dropped_attributes_count 4 }
            body = b"\x09" + _Q(event.timestamp) + _field(b"\x12", event.name.encode())
            if event.attributes:
                body += self._attributes_of(b"\x1a", event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(b"\x5a", body))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            # Link { trace_id 1, span_id 2, trace_state 3, repeated attributes 4, dropped 5, fixed32 flags 6 }
            body = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
            body += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
            if link.context.trace_state:
                body += _field(b"\x1a", _trace_state(link.context))
            if link.attributes:
                body += self._attributes_of(b"\x22", link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + _I(_flags(link.context))
            parts.append(_field(b"\x6a", body))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        # Status { message 2, code 3 }; always present, as the SDK's encoder writes it
        status = b""
        if span.status.description:
            status += _field(b"\x12", span.status.description.encode())
        if span.status.status_code.value:
            status += b"\x18" + _varint(span.status.status_code.value)
        parts.append(_field(b"\x7a", status))
        parts.append(b"\x85\x01" + _I(_flags(parent)))  # field 16, fixed32
        return b"".join(parts)

    def _attributes_of(self, tag: bytes, attributes: Mapping[str, Any]) -> bytes:
        cache = self._attributes
        out = []
        for key, value in attributes.items():
            try:
                cached = cache.get((key, type(value), value))
            except TypeError:  # an unhashable value (a list): encoded every time
                out.append(_field(tag, _key_value(key, value)))
                continue
            if cached is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cached = cache[(key, type(value), value)] = _field(tag, _key_value(key, value))
            out.append(cached)
        return b"".join(out)

    def _resource(self, resource: Resource) -> bytes:
        """Resource { repeated KeyValue attributes 1 }, as field 1 of ResourceSpans."""
        encoded = self._resources.get(resource)
        if encoded is None:
            body = b"".join(_field(b"\x0a", _key_value(k, v)) for k, v in resource.attributes.items())
            encoded = self._resources[resource] = _field(b"\x0a", body)
        return encoded

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        """InstrumentationScope { name 1, version 2, repeated attributes 3 }, as field 1 of ScopeSpans."""
        encoded = self._scopes.get(scope)
        if encoded is None:
            body = b""
            if scope is not None:
                body += _field(b"\x0a", scope.name.encode()) if scope.name else b""
                body += _field(b"\x12", scope.version.encode()) if scope.version else b""
                for key, value in (scope.attributes or {}).items():
                    body += _field(b"\x1a", _key_value(key, value))
            encoded = self._scopes[scope] = _field(b"\x0a", body)
        return encoded


def _schema(owner: Resource | InstrumentationScope | None) -> bytes:
    url = owner.schema_url if owner is not None else None
    return _field(b"\x1a", url.encode()) if url else b""


def _trace_state(context: SpanContext) -> bytes:
    return ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE
