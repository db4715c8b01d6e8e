"""How fresh each stream's aggregates are, as every gateway worker sees it: the consumers' lag measured at the
source once a second, and the reports the consumers leave there (app/streams/sources.py).

Serving asks `behind(stream, max_lag_s)` without any I/O. While the source cannot be asked, the lag is taken to
grow from its last measure (a source that is down holds no fresher events than it did, and neither can its
consumers), so a group's `max_lag` turns its aggregates EXPIRED then too. A stream without a source (events over
HTTP only) has no lag: its events are servable when `POST /v1/events` answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from app.errors import describe_error
from app.registry.model import Registry, Stream
from app.streams.sources import ConsumerReport, SourceLag, StreamSource, open_source, source_type

log = logging.getLogger(__name__)

LIVE_S = 10.0  # a consumer whose report is older than this is not counted as running


@dataclass(slots=True)
class StreamFreshness:
    source: str  # its type: redis_stream, nats
    lag: SourceLag | None = None  # the last measure (None: none yet)
    measured: float = field(default_factory=time.monotonic)  # when it was taken (or when watching began)
    error: str | None = None  # why the last probe failed
    consumers: list[ConsumerReport] = field(default_factory=list)

    def lag_seconds(self, now: float | None = None) -> float:
        """The lag now: the last measure, plus the time since, when the source has not answered since."""
        base = 0.0 if self.lag is None else self.lag.seconds
        if self.error is None and self.lag is not None:
            return base
        return base + max(0.0, (time.monotonic() if now is None else now) - self.measured)

    def live_consumers(self, now_unix: float | None = None) -> list[ConsumerReport]:
        now = time.time() if now_unix is None else now_unix
        return [r for r in self.consumers if now - r.at <= LIVE_S]


def watched_streams(registry: Registry) -> dict[str, Stream]:
    """The streams whose lag a monitor measures: those with a source it can ask."""
    return {name: s for name, s in registry.streams.items() if source_type(s) in ("redis_stream", "nats")}


class FreshnessMonitor:
    """The freshness of every stream with a source, probed every `interval_s` in the background."""

    def __init__(self, registry: Registry, *, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.streams: dict[str, StreamFreshness] = {}
        self._sources: dict[str, StreamSource] = {}
        for stream in watched_streams(registry).values():
            self._sources[stream.name] = open_source(stream, f"fg-freshness:{os.getpid()}")
            self.streams[stream.name] = StreamFreshness(source_type(stream) or "")

    def __bool__(self) -> bool:
        return bool(self._sources)

    def behind(self, stream: str, max_lag_s: float) -> bool:
        """Is the stream further behind than `max_lag_s`? False for a stream without a source."""
        state = self.streams.get(stream)
        return state is not None and state.lag_seconds() > max_lag_s

    async def probe(self) -> None:
        await asyncio.gather(*(self._probe(name, source) for name, source in self._sources.items()))

    async def _probe(self, name: str, source: StreamSource) -> None:
        state = self.streams[name]
        try:
            async with asyncio.timeout(self.timeout_s):
                lag = await source.lag()
        except Exception as exc:  # the source down: the lag grows from the last measure (see lag_seconds)
            if state.error is None:
                log.warning("stream %s: cannot measure its lag: %s", name, describe_error(exc))
            state.error = describe_error(exc)
            return
        state.lag, state.error, state.measured = lag, None, time.monotonic()
        try:  # the reports are for people: failing to read them says nothing of the lag
            async with asyncio.timeout(self.timeout_s):
                state.consumers = await source.reports()
        except Exception as exc:
            log.warning("stream %s: cannot read its consumers' reports: %s", name, describe_error(exc))

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        for source in self._sources.values():
            with contextlib.suppress(Exception):
                await source.aclose()
