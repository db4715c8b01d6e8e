"""Where a stream's events come from (Redis Streams, NATS JetStream), as consumers and the gateway's freshness
monitor both see it: how far behind the consumers are, and the reports consumers leave for the gateway.

Lag is measured at the source, never reported by the consumers: when every consumer is dead, messages pile up
and the lag grows, which is what `max_lag` is for. Its events are the messages not yet acknowledged (pending or
never delivered); its seconds are the age of the oldest of them by the server's clock (0 when there is none, so
a quiet stream is not a late one).

A consumer's report (what it stored, its event-to-servable latencies) is kept next to the stream: a hash field
per consumer in `<stream key>:fg-consumers` on Redis, a key per consumer in the KV bucket
`FG_consumers_<subject>_<durable>` on NATS (entries expire after a day there; on Redis a consumer prunes reports
older than a day when it starts).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.metrics import LATENCY_BUCKETS_S
from app.registry.model import Stream

REPORT_KEEP_S = 86_400  # a consumer gone for a day no longer counts in the sums


class SourceLag(msgspec.Struct, frozen=True):
    events: int | None  # messages not yet acknowledged (None: the server cannot count them, e.g. after XDEL)
    seconds: float  # the age of the oldest of them


class ConsumerReport(msgspec.Struct):
    """What one consumer has done since it first ran under its name; counts only grow, across restarts."""

    name: str
    at: float  # unix seconds: when it wrote this
    stored: int = 0  # messages stored and acknowledged
    dead: int = 0  # messages that were not events, set aside
    # event-to-servable: from the message's append to the source until its batch was stored (LATENCY_BUCKETS_S)
    latency: list[int] = msgspec.field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum: float = 0.0


class StreamSource(Protocol):
    """A stream's server, for the gateway's freshness monitor."""

    type: str

    async def lag(self) -> SourceLag: ...

    async def reports(self) -> list[ConsumerReport]: ...

    async def aclose(self) -> None: ...


def source_type(stream: Stream) -> str | None:
    return (stream.source or {}).get("type")


def open_source(stream: Stream, client_name: str) -> StreamSource:
    if source_type(stream) == "redis_stream":
        return RedisStreamSource(stream, client_name)
    return NatsSource(stream, client_name)


def _id_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


@dataclass(frozen=True, slots=True)
class RedisTarget:
    url: str
    key: str  # the stream's key
    group: str  # the consumer group

    @classmethod
    def of(cls, stream: Stream) -> RedisTarget:
        source = stream.source or {}
        if source.get("type") != "redis_stream":
            raise ValueError(f"stream {stream.name} has no redis_stream source (source.type: {source.get('type')!r})")
        return cls(
            str(source["url"]), str(source.get("stream", stream.name)), str(source.get("group", "feature-gateway"))
        )


class RedisStreamSource:
    type = "redis_stream"

    def __init__(self, stream: Stream, client_name: str, *, socket_timeout: float = 2.0) -> None:
        self.target = RedisTarget.of(stream)
        self.reports_key = f"{self.target.key}:fg-consumers"
        self.client = Redis.from_url(
            self.target.url, socket_timeout=socket_timeout, client_name=client_name, retry_on_timeout=False
        )

    async def lag(self) -> SourceLag:
        key, name = self.target.key, self.target.group
        seconds, micros = await self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        try:
            groups = await self.client.xinfo_groups(key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return SourceLag(0, 0.0)  # nothing was ever sent
            raise
        group = next((g for g in groups if _text(g["name"]) == name), None)
        if group is None:  # no consumer has started yet: everything in the stream is behind
            first: Any = await self.client.xrange(key, count=1)
            length = await self.client.xlen(key)
            return SourceLag(length, (now_ms - _id_ms(first[0][0])) / 1000 if first else 0.0)
        pending, undelivered = int(group["pending"]), group.get("lag")
        oldest: list[int] = []
        if pending:
            summary = await self.client.xpending(key, name)
            if summary["min"] is not None:
                oldest.append(_id_ms(summary["min"]))
        following: Any = await self.client.xrange(key, min=b"(" + _bytes(group["last-delivered-id"]), count=1)
        if following:
            oldest.append(_id_ms(following[0][0]))
        events = None if undelivered is None else pending + int(undelivered)
        return SourceLag(events, max(0.0, (now_ms - min(oldest)) / 1000) if oldest else 0.0)

    async def reports(self) -> list[ConsumerReport]:
        found = await self.client.hgetall(self.reports_key)
        return [r for r in map(_decode_report, found.values()) if r is not None]

    async def save_report(self, report: ConsumerReport) -> None:
        await self.client.hset(self.reports_key, report.name, msgspec.json.encode(report))

    async def previous_report(self, name: str) -> ConsumerReport | None:
        """This consumer's report from an earlier run under the same name (its counts go on from there); reports
        of consumers gone for a day are removed on the way."""
        found = await self.client.hgetall(self.reports_key)
        mine = None
        for field, blob in found.items():
            report = _decode_report(blob)
            if _text(field) == name:
                mine = report
            elif report is None or time.time() - report.at > REPORT_KEEP_S:  # gone, or unreadable
                await self.client.hdel(self.reports_key, field)
        return mine

    async def aclose(self) -> None:
        await self.client.aclose()


class NatsSource:
    """JetStream: the stream holding the subject, the durable consumer's info, the KV bucket of reports."""

    type = "nats"

    def __init__(self, stream: Stream, client_name: str) -> None:
        source = stream.source or {}
        if source.get("type") != "nats":
            raise ValueError(f"stream {stream.name} has no nats source (source.type: {source.get('type')!r})")
        self.stream = stream
        self.url = str(source["url"])
        self.subject = str(source.get("subject", stream.name))
        self.durable = str(source.get("durable", "feature-gateway"))
        # One bucket per durable consumer of a subject, as the lag is (two deployments' `orders` stay apart)
        self.bucket = re.sub(r"[^A-Za-z0-9_-]", "_", f"FG_consumers_{self.subject}_{self.durable}")
        self.client_name = client_name
        self.nc: Any = None
        self.js: Any = None
        self._kv: Any = None

    async def connect(self) -> Any:
        """The JetStream context, connecting at first use (nats-py reconnects by itself afterwards)."""
        if self.nc is None:
            import nats

            self.nc = await nats.connect(
                self.url, name=self.client_name, connect_timeout=2, max_reconnect_attempts=-1, allow_reconnect=True
            )
            self.js = self.nc.jetstream(timeout=2)
        return self.js

    async def stream_name(self, create: bool = False) -> str | None:
        from nats.js.errors import NotFoundError

        js = await self.connect()
        try:
            name: str = await js.find_stream_name_by_subject(self.subject)
            return name
        except NotFoundError:
            if not create:
                return None
        name = f"FG_{self.stream.name}"
        await js.add_stream(name=name, subjects=[self.subject])
        return name

    async def lag(self) -> SourceLag:
        from nats.js.errors import NotFoundError

        js = await self.connect()
        name = await self.stream_name()
        if name is None:
            return SourceLag(0, 0.0)  # nothing was ever sent
        try:
            info = await js.consumer_info(name, self.durable)
        except NotFoundError:  # no consumer has started yet: everything in the stream is behind
            state = (await js.stream_info(name)).state
            first_seq, events = state.first_seq, state.messages
        else:
            first_seq, events = info.ack_floor.stream_seq + 1, info.num_pending + info.num_ack_pending
        if not events:
            return SourceLag(0, 0.0)
        try:
            oldest = await js.get_msg(name, seq=first_seq, subject=self.subject, next=True)
        except NotFoundError:
            return SourceLag(events, 0.0)  # acknowledged (and removed) meanwhile
        return SourceLag(events, max(0.0, time.time() - oldest.time.timestamp()))

    async def _bucket(self) -> Any:
        if self._kv is None:
            from nats.js.api import KeyValueConfig

            js = await self.connect()
            self._kv = await js.create_key_value(KeyValueConfig(bucket=self.bucket, history=1, ttl=REPORT_KEEP_S))
        return self._kv

    @staticmethod
    def _key(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_=-]", "_", name)  # what a KV key may hold; the name itself is in the report

    async def reports(self) -> list[ConsumerReport]:
        from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

        js = await self.connect()
        try:  # the bucket is the consumers' to create: a gateway only reads it
            kv = self._kv or await js.key_value(self.bucket)
            keys = await kv.keys()
        except (BucketNotFoundError, NoKeysError):
            return []
        found = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # expired since it was listed
                continue
            report = _decode_report(entry.value) if entry.value else None
            if report is not None:
                found.append(report)
        return found

    async def save_report(self, report: ConsumerReport) -> None:
        kv = await self._bucket()
        await kv.put(self._key(report.name), msgspec.json.encode(report))

    async def previous_report(self, name: str) -> ConsumerReport | None:
        from nats.js.errors import KeyNotFoundError

        kv = await self._bucket()
        try:
            entry = await kv.get(self._key(name))
        except KeyNotFoundError:
            return None
        return _decode_report(entry.value) if entry.value else None

    async def aclose(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def _decode_report(blob: bytes | str) -> ConsumerReport | None:
    """None for a report this version cannot read (another layout): one bad report must not hide the others."""
    try:
        return msgspec.json.decode(blob, type=ConsumerReport)
    except msgspec.DecodeError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
