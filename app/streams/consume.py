"""`feature-gateway consume`: a stream's events read from Redis Streams into its aggregation groups.

Several consumers share a stream through a consumer group (XREADGROUP): each entry goes to one of them, and is
acknowledged (XACK) only once its batch is stored, so a consumer that dies leaves its entries pending; the others
claim entries pending longer than `claim_idle_ms` (XAUTOCLAIM) and store them. Delivery is at least once; the
event id (the entry's `event_id` field, else its stream entry id) makes the aggregates exactly once.

An entry holds the event's fields as entry fields (text, typed by the stream's dtypes; the event time as RFC 3339
or epoch milliseconds), or one field `json` holding the whole event. An entry that is not a valid event is copied
to `<stream key>:dead` with the reason, and acknowledged, so it cannot block the stream.
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


class RedisStreamConsumer:
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
        self.source = RedisSource.of(stream)
        self.name = name
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.client = Redis.from_url(
            self.source.url, socket_timeout=block_ms / 1000 + 10, client_name=f"fg-consume:{name}"
        )
        self.stored = 0  # entries stored (new, duplicate or late alike) and acknowledged
        self.dead = 0

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
            claim_from, entries = claimed[0], claimed[1]
            if not entries:
                read: Any = await self.client.xreadgroup(
                    group, self.name, {key: ">"}, count=self.batch, block=self.block_ms
                )
                entries = read[0][1] if read else []  # RESP2: [[key, entries]]
            if entries:
                await self._handle(entries, stop)

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]], stop: asyncio.Event) -> None:
        events: list[Event] = []
        dead: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            try:
                item = entry_event(self.stream, entry_id.decode(), fields)
                events += parse_events(self.stream, [item], self.gw.limits)
            except (ValidationFailed, ValueError) as exc:
                reason = f"{exc.field}: {exc.detail}" if isinstance(exc, ValidationFailed) else str(exc)
                dead.append((entry_id, fields, reason.replace("events[0].", "")))
        delay = 0.1
        while events:
            try:
                await ingest(self.gw, self.stream, events)
                break
            except BackendFailed as exc:  # not acknowledged: retried here, or claimed by another consumer
                log.warning("consumer %s: %s; retrying in %.1f s", self.name, exc.detail, delay)
                if stop.is_set():
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for entry_id, fields, reason in dead:
            log.warning(
                "consumer %s: entry %s is not a valid event (%s): moved to %s:dead",
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
