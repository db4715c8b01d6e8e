"""Exporting finished spans over OTLP/HTTP without making requests wait for it.

The SDK's BatchSpanProcessor + OTLPSpanExporter do the same job, but at about 50 us of CPU per span, most of it
the protobuf encoding in the export thread, which holds the GIL while the event loop waits (see encode.py).
Here a span that ends is appended to a bounded queue (when full, it is dropped and counted: a request never
waits for tracing), and a thread wakes when a batch is full or the schedule delay has passed, encodes the batch
with encode.Encoder and posts it with the OTLP exporter's own HTTP client, so its retries, headers, TLS and
compression settings (OTEL_EXPORTER_OTLP_*) stay the SDK's. The queue and batch sizes follow the SDK's batch
processor settings, OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE and OTEL_BSP_SCHEDULE_DELAY.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from app.tracing.encode import Encoder

if TYPE_CHECKING:  # importing it loads requests: only when tracing is on (app/telemetry.py)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

log = logging.getLogger(__name__)


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, value, default)
        return default


class QueuedExport(SpanProcessor):
    """Finished spans -> a bounded queue -> a thread that encodes and posts them in batches."""

    def __init__(self, exporter: OTLPSpanExporter, environ: Mapping[str, str] = os.environ) -> None:
        self._exporter = exporter
        self.max_queue = _env_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch = max(1, min(_env_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self.max_queue))
        self.delay_s = _env_int(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        # deque.append and popleft are atomic: the event loop appends, the thread takes, with no lock between them
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._idle = threading.Event()  # set while the thread waits with nothing taken: force_flush waits on it
        self._flushing = False
        self.dropped = 0  # spans that found the queue full
        self.exported = 0
        self.failed = 0  # spans of batches the collector did not take (after the client's retries)
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled or self._done.is_set():
            return
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) >= self.batch and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        encoder = Encoder()
        while True:
            self._idle.set()
            woken = self._wake.wait(self.delay_s)
            self._idle.clear()
            self._wake.clear()
            # Woken because a batch filled up: full batches only. On the schedule, a flush or the end: all.
            self._drain(encoder, everything=not woken or self._flushing or self._done.is_set())
            if self._done.is_set():
                self._drain(encoder, everything=True)
                return

    def _drain(self, encoder: Encoder, everything: bool) -> None:
        """Exports what the queue held when called, never more: spans keep arriving while a batch is posted,
        and chasing them would post a handful at a time, at a millisecond of HTTP client per post."""
        queue = self._queue
        pending = len(queue) if everything else len(queue) - len(queue) % self.batch
        while pending:
            batch = [queue.popleft() for _ in range(min(self.batch, pending))]
            pending -= len(batch)
            try:
                ok = self._post(encoder.request(batch))
            except Exception:  # noqa: BLE001 (a span we cannot encode must not stop the thread)
                log.exception("could not export %d spans", len(batch))
                ok = False
            if ok:
                self.exported += len(batch)
            else:
                self.failed += len(batch)

    @staticmethod
    def can_post_with(exporter: OTLPSpanExporter) -> bool:
        """The exporter's HTTP client (private to the SDK, 1.4x) posts bytes with its retries and settings."""
        return callable(getattr(getattr(exporter, "_client", None), "export", None))

    def _post(self, data: bytes) -> bool:
        return bool(self._exporter._client.export(data).success)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        self._flushing = True
        try:
            while self._queue or not self._idle.is_set():
                self._wake.set()
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)
            return True
        finally:
            self._flushing = False

    def shutdown(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._exporter.shutdown()  # type: ignore[no-untyped-call]
