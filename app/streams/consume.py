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
import re
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from app.errors import BackendFailed, ValidationFailed
from app.metrics import LATENCY_BUCKETS_S
from app.registry.model import Stream
from app.serving.limits import Limits
from app.streams.ingest import ingest, parse_events
from app.streams.sources import ConsumerReport, NatsSource, RedisStreamSource
from app.streams.tiles import Event

if TYPE_CHECKING:
    from app.serving.gateway import Gateway

log = logging.getLogger(__name__)

_TRUE, _FALSE = {"1", "true", "True"}, {"0", "false", "False"}


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


_INDEX = re.compile(r"events\[(\d+)\]\.?")


def _reason(exc: BaseException) -> str:
    text = f"{exc.field}: {exc.detail}" if isinstance(exc, ValidationFailed) else f"{type(exc).__name__}: {exc}"
    return _INDEX.sub("", text, count=1)[:500]


def _checked(
    stream: Stream, items: list[tuple[str, dict[str, Any] | BaseException]], limits: Limits
) -> tuple[list[Event], list[tuple[int, str]]]:
    """The valid events of a batch, checked together (one pass, as `POST /v1/events` does), and the messages
    that are not events (index, why): each bad one found is set aside and the check goes on after it."""
    events: list[Event] = []
    dead = [(i, _reason(item)) for i, (_, item) in enumerate(items) if isinstance(item, BaseException)]
    valid = [(i, item) for i, (_, item) in enumerate(items) if not isinstance(item, BaseException)]
    start = 0
    while start < len(valid):
        rest = [item for _, item in valid[start:]]
        try:
            events += parse_events(stream, rest, limits)
            break
        except (ValidationFailed, ValueError, RecursionError) as exc:
            found = _INDEX.match(exc.field or "") if isinstance(exc, ValidationFailed) else None
            if found is None:  # not about one event (the batch as a whole): every message on its own
                for i, item in valid[start:]:
                    try:
                        events += parse_events(stream, [item], limits)
                    except (ValidationFailed, ValueError, RecursionError) as one:
                        dead.append((i, _reason(one)))
                break
            bad = int(found.group(1))
            if bad:
                events += parse_events(stream, rest[:bad], limits)  # (checked already, and good)
            dead.append((valid[start + bad][0], _reason(exc)))
            start += bad + 1
    return events, sorted(dead)


async def store_items(
    gw: Gateway, stream: Stream, items: list[tuple[str, dict[str, Any] | BaseException]], stop: asyncio.Event
) -> list[tuple[int, str]] | None:
    """Check and store a batch of messages as events ((its position, the event or why it could not be read));
    retried while the stores fail, unless `stop` is set (then None: acknowledge nothing). Answers the messages
    that are not valid events (index, why), which the caller sets aside."""
    events, dead = _checked(stream, items, gw.limits)
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
    """What every consumer is given and counts; subclasses read their server.

    Every second it leaves a report at the source (app/streams/sources.py) for the gateways to show: what it
    stored and how long its messages took from their append to the source until they were servable."""

    REPORT_EVERY_S = 1.0

    def __init__(
        self,
        gw: Gateway,
        stream: Stream,
        name: str,
        *,
        batch: int = 1000,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        inflight: int = 2,
    ) -> None:
        self.gw = gw
        self.stream = stream
        self.name = name
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.inflight = inflight  # batches stored at once (Redis Streams; JetStream takes one at a time)
        self.stored = 0  # messages stored (new, duplicate or late alike) and acknowledged, in this run
        self.dead = 0  # messages that were not events, set aside, in this run
        self.source: RedisStreamSource | NatsSource
        self.report = ConsumerReport(name, time.time())
        self._reported = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        previous = await self.source.previous_report(self.name)
        if previous is not None:  # the counts go on from the last run under this name (Prometheus counters)
            self.report = previous
        try:
            await self.consume(stop)
        finally:
            await self._save_report(force=True)

    async def consume(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def done(self, appended_s: Sequence[float], stored: int, dead: int) -> None:
        """A batch acknowledged: `appended_s`, when each of its stored messages was appended to the source."""
        now = time.time()
        report = self.report
        for appended in appended_s:
            seconds = max(0.0, now - appended)
            report.latency[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            report.latency_sum += seconds
        report.stored += stored
        report.dead += dead
        self.stored += stored
        self.dead += dead
        await self._save_report()

    async def _save_report(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._reported < self.REPORT_EVERY_S:
            return
        self._reported = now
        self.report.at = now
        try:
            await self.source.save_report(self.report)
        except Exception as exc:  # the report is for people; the events are what must not stop
            log.warning("consumer %s: could not leave its report: %s: %s", self.name, type(exc).__name__, exc)

    async def aclose(self) -> None:
        await self.source.aclose()


class RedisStreamConsumer(Consumer):
    def __init__(self, gw: Gateway, stream: Stream, name: str, **options: int) -> None:
        super().__init__(gw, stream, name, **options)
        source = RedisStreamSource(stream, f"fg-consume:{name}", socket_timeout=self.block_ms / 1000 + 10)
        self.source, self.target, self.client = source, source.target, source.client
        self._claim_from = "0-0"  # where the scan of pending entries goes on (0-0: it is through)
        self._claimed_at = -float("inf")  # when it last went through
        self._claiming = False
        # Entries this consumer is storing now: a batch that retries past claim_idle_ms is not claimed by its twin
        self._inflight: set[bytes] = set()

    async def consume(self, stop: asyncio.Event) -> None:
        try:
            await self.client.xgroup_create(self.target.key, self.target.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # Two batches in flight: one is checked and folded here while the other waits on Redis (its reads and its
        # script); the tile store redoes only the entities both touched (backends/redis.py)
        await asyncio.gather(*(self._lane(stop) for _ in range(self.inflight)))

    async def _lane(self, stop: asyncio.Event) -> None:
        key, group = self.target.key, self.target.group
        while not stop.is_set():
            # Entries a consumer took and never acknowledged (it died, or its store failed), then new ones
            entries = await self._claim()
            if not entries:
                read: Any = await self.client.xreadgroup(
                    group, self.name, {key: ">"}, count=self.batch, block=self.block_ms
                )
                entries = read[0][1] if read else []  # RESP2: [[key, entries]]
            if entries:
                await self._handle(entries, stop)

    async def _claim(self) -> list[Any]:
        """Entries idle past `claim_idle_ms` in any consumer's pending list, taken over (XAUTOCLAIM). A scan of
        the pending lists goes on batch after batch until it is through, then starts again after half the idle
        time: nothing can become claimable sooner than that after the scan passed it."""
        now = time.monotonic()
        if self._claiming or (self._claim_from == "0-0" and now - self._claimed_at < self.claim_idle_ms / 2000):
            return []
        self._claiming = True
        try:
            claimed = await self.client.xautoclaim(
                self.target.key,
                self.target.group,
                self.name,
                self.claim_idle_ms,
                start_id=self._claim_from,
                count=self.batch,
            )
        finally:
            self._claiming = False
        cursor = claimed[0].decode() if isinstance(claimed[0], bytes) else str(claimed[0])
        if cursor == "0-0":
            self._claimed_at = now
        self._claim_from = cursor
        # (Redis 6.2 answers deleted pending entries as nil: nothing to store, they are gone)
        return [e for e in claimed[1] if e and e[0] is not None and e[0] not in self._inflight]

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]], stop: asyncio.Event) -> None:
        ids = {entry_id for entry_id, _ in entries}
        self._inflight |= ids
        try:
            await self._store(entries, stop)
        finally:
            self._inflight -= ids

    async def _store(self, entries: list[tuple[bytes, dict[bytes, bytes]]], stop: asyncio.Event) -> None:
        target = self.target
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
                target.key,
            )
            copy: dict[Any, Any] = {**fields, b"error": reason.encode(), b"entry": entry_id}
            await self.client.xadd(f"{target.key}:dead", copy)
        await self.client.xack(target.key, target.group, *(entry_id for entry_id, _ in entries))
        rejected = {i for i, _ in dead}
        # An entry id's first part is the Redis server's clock at XADD, in milliseconds
        appended = [int(item_id.partition("-")[0]) / 1000 for i, (item_id, _) in enumerate(items) if i not in rejected]
        await self.done(appended, len(entries) - len(dead), len(dead))


class NatsConsumer(Consumer):
    """A durable JetStream pull consumer on the stream's subject (nats-py, the `nats` extra)."""

    def __init__(self, gw: Gateway, stream: Stream, name: str, **options: int) -> None:
        super().__init__(gw, stream, name, **options)
        self.source = NatsSource(stream, f"fg-consume:{name}")

    async def consume(self, stop: asyncio.Event) -> None:
        from nats.js.api import ConsumerConfig

        source = self.source
        assert isinstance(source, NatsSource)
        js = await source.connect()
        await source.stream_name(create=True)
        subscription = await js.pull_subscribe(
            source.subject,
            durable=source.durable,
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
        appended = []
        for i, message in enumerate(messages):
            if i not in rejected:
                await message.ack()
                appended.append(message.metadata.timestamp.timestamp())  # the server's clock at publish
        await self.done(appended, len(messages) - len(dead), len(dead))
