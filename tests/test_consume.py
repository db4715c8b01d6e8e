"""`feature-gateway consume` on a real Redis Stream: several consumer processes share it, one is killed with
SIGKILL mid-stream, the others claim what it left pending, and every event is counted exactly once."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from app.registry.load import parse_registry
from app.streams.sources import NatsSource
from tests.support.clients import fetch
from tests.support.gateways import GatewayFactory
from tests.support.registries import REDIS_URL, Names
from tests.support.waiting import eventually

ENTITIES = 20


def registry(names: Names) -> str:
    base = names.registry(names.backend("redis"))
    head, _, groups = base.partition("groups:\n")
    stream = f"""streams:
  orders:
    entity: consumer
    event_time: ts
    fields: {{value: float64}}
    source: {{type: redis_stream, url: "{REDIS_URL}", stream: "{names.prefix}orders", group: fg}}
groups:
  orders_agg:
    backend: hot
    stream: orders
    allowed_lateness: 1h
    aggregations:
      n: {{function: count, windows: [1h]}}
      spent: {{function: sum, field: value, windows: [1h]}}
"""
    return head + stream + groups


class Consumer:
    def __init__(self, registry_path: Path, name: str, log: Path, claim_idle_ms: int = 500) -> None:
        self.log = log.open("wb")
        command = [sys.executable, "-m", "app", "consume", "--registry", str(registry_path), "--stream", "orders"]
        command += ["--name", name, "--batch", "50", "--block-ms", "200", "--claim-idle-ms", str(claim_idle_ms)]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.log.close()


async def group_info(client: redis.Redis, key: str) -> dict[str, Any]:
    groups = await client.xinfo_groups(key)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in groups[0].items()} if groups else {}


async def test_a_killed_consumer_loses_nothing_and_counts_nothing_twice(
    gateway: GatewayFactory, names: Names, tmp_path: Path
) -> None:
    text = registry(names)
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    key = f"{names.prefix}orders"
    client = redis.Redis.from_url(REDIS_URL)
    rng = random.Random(3)
    now_ms = int(time.time() * 1000)
    sent: list[tuple[int, float]] = []  # (consumer, value) of every distinct event
    try:
        pipe = client.pipeline(transaction=False)
        for _ in range(2000):  # no event_id: the entry id is the event's
            consumer, value = rng.randrange(1, ENTITIES + 1), float(rng.randrange(100))
            sent.append((consumer, value))
            pipe.xadd(key, {"consumer_id": consumer, "ts": now_ms - rng.randrange(1_200_000), "value": value})
        for resend in range(2):  # a producer sending 100 events twice: their ids make them count once
            for i in range(100):
                consumer, value = 1 + i % ENTITIES, float(i)
                if resend == 0:
                    sent.append((consumer, value))
                pipe.xadd(key, {"event_id": f"r{i}", "consumer_id": consumer, "ts": now_ms - 1000, "value": value})
        for _ in range(3):  # not events: dead-lettered, acknowledged, never blocking the stream
            pipe.xadd(key, {"consumer_id": 1, "ts": now_ms, "value": "abc"})
        await pipe.execute()
        total = 2000 + 200 + 3

        first = Consumer(path, "a", tmp_path / "a.log")

        async def read_some() -> bool:
            return int((await group_info(client, key)).get("entries-read") or 0) >= 300

        await eventually(read_some, within=60)
        first.stop(signal.SIGKILL)  # mid-stream: what it read and did not acknowledge stays pending
        at_kill = await group_info(client, key)
        others = [Consumer(path, name, tmp_path / f"{name}.log") for name in ("b", "c")]

        async def drained() -> bool:
            info = await group_info(client, key)
            return info["pending"] == 0 and info["lag"] == 0

        await eventually(drained, within=120)
        for consumer in others:
            consumer.stop()
        dead = await client.xlen(f"{key}:dead")
    finally:
        await client.aclose()
    async with gateway(text) as gw:
        answer = await fetch(
            gw,
            features=["orders_agg:n_1h", "orders_agg:spent_1h"],
            entities={"consumer_id": list(range(1, ENTITIES + 1))},
        )
    counted = sum(row["values"][0] for row in answer["rows"])
    spent = sum(row["values"][1] for row in answer["rows"])
    print(
        f"entries {total}, read before the kill {at_kill['entries-read']}, pending at the kill {at_kill['pending']}, "
        f"events counted {counted} of {len(sent)} distinct, dead {dead}"
    )
    assert int(at_kill["entries-read"]) < total  # the kill came mid-stream
    assert counted == len(sent) == 2100
    assert spent == sum(v for _, v in sent)
    for entity in range(1, ENTITIES + 1):
        row = answer["rows"][entity - 1]
        assert row["values"][0] == sum(1 for c, _ in sent if c == entity)
    assert dead == 3


NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")


async def test_nats_jetstream_consumers_share_a_stream_and_survive_a_kill(
    gateway: GatewayFactory, names: Names, tmp_path: Path
) -> None:
    import json

    import nats

    subject, stream_name = f"fg.{names.schema}.orders", f"FG_{names.schema}"
    text = registry(names).replace(
        f'source: {{type: redis_stream, url: "{REDIS_URL}", stream: "{names.prefix}orders", group: fg}}',
        f'source: {{type: nats, url: "{NATS_URL}", subject: "{subject}", durable: fg}}',
    )
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    rng = random.Random(5)
    now_ms = int(time.time() * 1000)
    sent: list[tuple[int, float]] = []
    try:
        await js.add_stream(name=stream_name, subjects=[subject])
        for _ in range(2000):
            consumer, value = rng.randrange(1, ENTITIES + 1), float(rng.randrange(100))
            sent.append((consumer, value))
            await js.publish(
                subject,
                json.dumps({"consumer_id": consumer, "ts": now_ms - rng.randrange(1_200_000), "value": value}).encode(),
            )
        for resend in range(2):
            for i in range(100):
                consumer, value = 1 + i % ENTITIES, float(i)
                if resend == 0:
                    sent.append((consumer, value))
                await js.publish(
                    subject,
                    json.dumps(
                        {"event_id": f"r{i}", "consumer_id": consumer, "ts": now_ms - 1000, "value": value}
                    ).encode(),
                )
        for _ in range(3):
            await js.publish(subject, b'{"consumer_id": 1, "ts": 0, "value": "abc"}')

        first = Consumer(path, "a", tmp_path / "a.log", claim_idle_ms=1000)

        async def delivered(at_least: int) -> bool:
            try:
                info = await js.consumer_info(stream_name, "fg")
            except nats.js.errors.NotFoundError:
                return False
            return bool(info.delivered.stream_seq >= at_least)

        await eventually(lambda: delivered(300), within=60)
        first.stop(signal.SIGKILL)
        at_kill = await js.consumer_info(stream_name, "fg")
        others = [Consumer(path, name, tmp_path / f"{name}.log", claim_idle_ms=1000) for name in ("b", "c")]

        async def drained() -> bool:
            info = await js.consumer_info(stream_name, "fg")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(drained, within=120)
        for consumer in others:
            consumer.stop()
    finally:
        try:
            await js.delete_stream(stream_name)
            with contextlib.suppress(nats.js.errors.NotFoundError):  # the consumers' reports (app/streams/sources.py)
                await js.delete_key_value(NatsSource(parse_registry(text, "t").streams["orders"], "test").bucket)
        finally:
            await nc.close()
    async with gateway(text) as gw:
        answer = await fetch(gw, features=["orders_agg:n_1h"], entities={"consumer_id": list(range(1, ENTITIES + 1))})
    counted = sum(row["values"][0] for row in answer["rows"])
    print(
        f"messages 2203, delivered before the kill {at_kill.delivered.stream_seq}, unacknowledged at the kill "
        f"{at_kill.num_ack_pending}, events counted {counted} of {len(sent)} distinct"
    )
    assert at_kill.delivered.stream_seq < 2203
    assert counted == len(sent) == 2100


def test_a_batch_sets_aside_each_bad_message_and_keeps_every_good_one() -> None:
    """Messages are checked together; each bad one is set aside with its reason (the field, not its position in
    the batch), the check going on after it."""
    from app.serving.limits import Limits
    from app.streams.consume import _checked

    text = """
entities:
  consumer: {join_key: consumer_id, dtype: int64}
backends:
  hot: {type: sqlite, path: /tmp/unused.sqlite}
streams:
  orders: {entity: consumer, event_time: ts, fields: {value: float64}}
groups:
  agg: {backend: hot, stream: orders, aggregations: {n: {function: count, windows: [1h]}}}
"""
    stream = parse_registry(text, "t", env={}).streams["orders"]
    now_ms = int(time.time() * 1000)

    def good(i: int) -> dict[str, Any]:
        return {"event_id": f"e{i}", "consumer_id": i, "ts": now_ms, "value": 1.0}

    items: list[tuple[str, dict[str, Any] | BaseException]] = [(str(i), good(i)) for i in range(8)]
    items[0] = ("0", {**good(0), "value": "abc"})
    items[2] = ("2", ValueError("not JSON"))
    items[5] = ("5", {**good(5), "colour": "red"})
    items[7] = ("7", {"event_id": "e7", "ts": now_ms})
    events, dead = _checked(stream, items, Limits())
    assert [e.event_id for e in events] == ["e1", "e3", "e4", "e6"]
    assert [i for i, _ in dead] == [0, 2, 5, 7]
    reasons = dict(dead)
    assert reasons[0].startswith("value: ")
    assert reasons[2] == "ValueError: not JSON"
    assert reasons[5].startswith("colour: unknown field")
    assert reasons[7].startswith("consumer_id: ")
