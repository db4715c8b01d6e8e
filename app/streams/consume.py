"""`feature-gateway consume`: a stream's events read from Redis Streams or NATS JetStream into its aggregation
groups, in batches, through the same path as `POST /v1/events/{stream}`.

Several consumers share a stream: a Redis consumer group (XREADGROUP), or a durable JetStream pull consumer.
A message is acknowledged only once its batch is stored, so a consumer that dies leaves its messages pending,
and the others get them: Redis entries pending longer than `claim_idle_ms` are claimed (XAUTOCLAIM); JetStream
redelivers messages not acknowledged within its ack wait (set to the same). Delivery is at least once; the event
id (the message's `event_id`, else its position: the Redis entry id, the JetStream stream sequence) makes the
aggregates exactly once.

A NATS message is the event as JSON; a JetStream stream holding the subject is created (`FG_<stream>`) when
none does.

An entry holds the event's fields as entry fields (text, typed by the stream's dtypes; the event time as RFC 3339
or epoch milliseconds), or one field `json` holding the whole event. An entry that is not a valid event is copied
to `<stream key>:dead` with the reason, and acknowledged, so it cannot block the stream; an invalid NATS message is
terminated (never redelivered) and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.errors import BackendFailed, ValidationFailed
from app.registry.model import Stream
from app.streams.ingest import ingest, parse_events
from app.streams.tiles import Event

if TYPE_CHECKING:
    from app.serving.gateway import Gateway

log = logging.getLogger(__name__)

_TRUE, _FALSE = {"1", "true", "True"}, {"0", "false", "False"}


@dataclass(frozen=True, slots=True)
class RedisSource:
    url: str
    key: str  # the stream's key
    group: str  # the consumer group

    @classmethod
    def of(cls, stream: Stream) -> RedisSource:
        source = stream.source or {}
        if source.get("type") != "redis_stream":
            raise ValueError(f"stream {stream.name} has no redis_stream source (source.type: {source.get('type')!r})")
        return cls(
            str(source["url"]), str(source.get("stream", stream.name)), str(source.get("group", "feature-gateway"))
        )


def entry_event(stream: Stream, entry_id: str, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A stream entry as the event `parse_events` checks: JSON in a `json` field, or text fields typed by the
    stream (an id or number that does not parse stays text, and is refused by name)."""
    if b"json" in fields:
        item = json.loads(fields[b"json"])
        if not isinstance(item, dict):
            raise ValidationFailed("the json field holds an object", field="json")
    else:
        item = {k.decode(): v.decode() for k, v in fields.items()}
        kinds = {name: dtype.kind for name, dtype in stream.fields.items()}
        kinds[stream.entity.join_key] = stream.entity.dtype.kind
        for name, text in item.items():
            kind = kinds.get(name)
            try:
                if kind == "int64" or (name == stream.event_time and text.isdigit()):
                    item[name] = int(text)
                elif kind == "float64":
                    item[name] = float(text)
                elif kind == "bool":
                    item[name] = True if text in _TRUE else False if text in _FALSE else text
            except ValueError:
                pass  # left as text: the dtype check names it
    item.setdefault("event_id", entry_id)
    return item


async def store_items(
    gw: Gateway, stream: Stream, items: list[tuple[str, dict[str, Any] | BaseException]], stop: asyncio.Event
) -> list[tuple[int, str]] | None:
    """Check and store a batch of messages as events ((its position, the event or why it could not be read));
    retried while the stores fail, unless `stop` is set (then None: acknowledge nothing). Answers the messages
    that are not valid events (index, why), which the caller sets aside."""
    events: list[Event] = []
    dead: list[tuple[int, str]] = []
    for i, (_, item) in enumerate(items):
        try:
            if isinstance(item, BaseException):
                raise item
            events += parse_events(stream, [item], gw.limits)
        except (ValidationFailed, ValueError, RecursionError) as exc:
            reason = (
                f"{exc.field}: {exc.detail}" if isinstance(exc, ValidationFailed) else f"{type(exc).__name__}: {exc}"
            )
            dead.append((i, reason.replace("events[0].", "")[:500]))
    delay = 0.1
    while events:
        try:
            await ingest(gw, stream, events)
            break
        except BackendFailed as exc:  # not acknowledged: retried here, or redelivered to another consumer
            log.warning("stream %s: %s; retrying in %.1f s", stream.name, exc.detail, delay)
            if stop.is_set():
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    return dead


class Consumer:
    """What every consumer is given and counts; subclasses read their server."""

    def __init__(
        self,
        gw: Gateway,
        stream: Stream,
        name: str,
        *,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
    ) -> None:
        self.gw = gw
        self.stream = stream
        self.name = name
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.stored = 0  # messages stored (new, duplicate or late alike) and acknowledged
        self.dead = 0  # messages that were not events, set aside

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class RedisStreamConsumer(Consumer):
    def __init__(self, gw: Gateway, stream: Stream, name: str, **options: int) -> None:
        super().__init__(gw, stream, name, **options)
        self.source = RedisSource.of(stream)
        self.client = Redis.from_url(
            self.source.url, socket_timeout=self.block_ms / 1000 + 10, client_name=f"fg-consume:{name}"
        )

    async def run(self, stop: asyncio.Event) -> None:
        key, group = self.source.key, self.source.group
        try:
            await self.client.xgroup_create(key, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        claim_from = "0-0"
        while not stop.is_set():
            # Entries a consumer took and never acknowledged (it died, or its store failed), then new ones
            claimed = await self.client.xautoclaim(
                key, group, self.name, self.claim_idle_ms, start_id=claim_from, count=self.batch
            )
            # (Redis 6.2 answers deleted pending entries as nil: nothing to store, they are gone)
            claim_from, entries = claimed[0], [e for e in claimed[1] if e and e[0] is not None]
            if not entries:
                read: Any = await self.client.xreadgroup(
                    group, self.name, {key: ">"}, count=self.batch, block=self.block_ms
                )
                entries = read[0][1] if read else []  # RESP2: [[key, entries]]
            if entries:
                await self._handle(entries, stop)

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]], stop: asyncio.Event) -> None:
        items: list[tuple[str, dict[str, Any] | BaseException]] = []
        for entry_id, fields in entries:
            try:
                items.append((entry_id.decode(), entry_event(self.stream, entry_id.decode(), fields)))
            except (ValidationFailed, ValueError, RecursionError) as exc:
                items.append((entry_id.decode(), exc))
        dead = await store_items(self.gw, self.stream, items, stop)
        if dead is None:
            return
        for i, reason in dead:
            entry_id, fields = entries[i]
            log.warning(
                "consumer %s: entry %s is not an event (%s): moved to %s:dead",
                self.name,
                entry_id.decode(),
                reason,
                self.source.key,
            )
            copy: dict[Any, Any] = {**fields, b"error": reason.encode(), b"entry": entry_id}
            await self.client.xadd(f"{self.source.key}:dead", copy)
        await self.client.xack(self.source.key, self.source.group, *(entry_id for entry_id, _ in entries))
        self.stored += len(entries) - len(dead)
        self.dead += len(dead)

    async def aclose(self) -> None:
        await self.client.aclose()


class NatsConsumer(Consumer):
    """A durable JetStream pull consumer on the stream's subject (nats-py, the `nats` extra)."""

    def __init__(self, gw: Gateway, stream: Stream, name: str, **options: int) -> None:
        super().__init__(gw, stream, name, **options)
        source = stream.source or {}
        if source.get("type") != "nats":
            raise ValueError(f"stream {stream.name} has no nats source (source.type: {source.get('type')!r})")
        self.url = str(source["url"])
        self.subject = str(source.get("subject", stream.name))
        self.durable = str(source.get("durable", "feature-gateway"))
        self._nc: Any = None

    async def run(self, stop: asyncio.Event) -> None:
        import nats
        from nats.js.api import ConsumerConfig
        from nats.js.errors import NotFoundError

        self._nc = await nats.connect(self.url, name=f"fg-consume:{self.name}")
        js = self._nc.jetstream()
        try:
            await js.find_stream_name_by_subject(self.subject)
        except NotFoundError:
            await js.add_stream(name=f"FG_{self.stream.name}", subjects=[self.subject])
        subscription = await js.pull_subscribe(
            self.subject,
            durable=self.durable,
            config=ConsumerConfig(ack_wait=self.claim_idle_ms / 1000, max_ack_pending=-1),
        )
        while not stop.is_set():
            try:
                messages = await subscription.fetch(self.batch, timeout=self.block_ms / 1000)
            except TimeoutError:
                continue
            await self._handle(messages, stop)

    async def _handle(self, messages: list[Any], stop: asyncio.Event) -> None:
        items: list[tuple[str, dict[str, Any] | BaseException]] = []
        for message in messages:
            sequence = str(message.metadata.sequence.stream)
            try:
                item = json.loads(message.data)
                if not isinstance(item, dict):
                    raise ValueError("a message is an event: a JSON object")
                item.setdefault("event_id", sequence)
                items.append((sequence, item))
            except (ValueError, RecursionError) as exc:
                items.append((sequence, exc))
        dead = await store_items(self.gw, self.stream, items, stop)
        if dead is None:
            return
        rejected = {i for i, _ in dead}
        for i, reason in dead:
            log.warning("consumer %s: message %s is not an event (%s): terminated", self.name, items[i][0], reason)
            await messages[i].term()
        for i, message in enumerate(messages):
            if i not in rejected:
                await message.ack()
        self.stored += len(messages) - len(dead)
        self.dead += len(dead)

    async def aclose(self) -> None:
        if self._nc is not None:
            await self._nc.close()
