"""Streaming aggregations (issue 13), against real processes on this machine's Redis and PostgreSQL.

    .venv/bin/python -m bench.streams [--backends redis,sqlite,postgres] [--batches 40] [--concurrency 4]
                                      [--consumer-events 60000] [--rate 5000] [--seconds 20] [--smoke]

Rows:
- **HTTP ingestion**, per backend: a gateway (`feature-gateway serve --workers 1`) takes `--batches` POSTs of
  1,000 events (10,000 entities, times in the last 4 minutes, 3 aggregations x 4 windows: 10m, 1h, 1d, 7d),
  `--concurrency` of them in flight. Events per second of wall time, and per CPU-second of the gateway's
  process (what one worker can take when the box is not shared with the client and the database).
- **Fetch**: 1 entity x 12 aggregate features against 12 stored features on the same backend, over HTTP, one at a
  time; p50 of each and their ratio. Storage per entity per aggregation, in bytes (Redis `MEMORY USAGE` of the tile
  hashes of 200 entities; PostgreSQL the tile table's size; SQLite the tile rows' bytes).
- **Consumer**: `--consumer-events` events XADDed to a Redis Stream first, then one `feature-gateway consume`
  process drains them into Redis tiles; events per second from its first acknowledgement to the last, and its CPU.
- **Freshness**: a consumer and a gateway running, a producer XADDs `--rate` events/s for `--seconds`; ten times a
  second a probe event for an entity of its own is XADDed and the gateway is polled (every 2 ms) until it serves
  it: p50/p99 from just before XADD to the answer that counts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from bench.measure import percentile
from bench.procs import GatewayProcess, gateway_command, group_cpu_seconds, log

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "postgresql://root@127.0.0.1:5432/test"
ENTITIES = 10_000
STORED = "".join(f"      f{i}: {{dtype: float64, default: 0.0}}\n" for i in range(12))
REGISTRY = """
backends:
  hot: {backend}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
streams:
  orders:
    entity: consumer
    event_time: ts
    fields: {{value: float64, cuisine: string}}
    {source}
groups:
  stored:
    entity: consumer
    backend: hot
    features:
{stored}
  agg:
    backend: hot
    stream: orders
    allowed_lateness: 5m
    aggregations:
      n: {{function: count, windows: [10m, 1h, 1d, 7d]}}
      total: {{function: sum, field: value, windows: [10m, 1h, 1d, 7d]}}
      kinds: {{function: count_distinct, field: cuisine, windows: [10m, 1h, 1d, 7d]}}
"""


def backend(kind: str, uid: str, folder: Path) -> str:
    if kind == "redis":
        return f'{{type: redis, url: "{REDIS_URL}", key_prefix: "bench-streams:{uid}:", timeout_ms: 5000}}'
    if kind == "postgres":
        return f'{{type: cockroach, dsn: "{PG_DSN}", schema: bs_{uid}, dialect: postgres, timeout_ms: 5000}}'
    return f'{{type: sqlite, path: "{folder / "bench.sqlite"}", timeout_ms: 5000}}'


def registry_file(kind: str, uid: str, folder: Path, stream_key: str | None = None) -> Path:
    source = (
        f'source: {{type: redis_stream, url: "{REDIS_URL}", stream: "{stream_key}", group: bench}}'
        if stream_key
        else ""
    )
    path = folder / "registry.yaml"
    path.write_text(REGISTRY.format(backend=backend(kind, uid, folder), stored=STORED, source=source))
    return path


def event(rng: random.Random, event_id: str, now: float, entity: int | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "consumer_id": rng.randrange(ENTITIES) if entity is None else entity,
        "ts": int((now - rng.random() * 240) * 1000),
        "value": round(rng.random() * 50, 2),
        "cuisine": rng.choice("abcdef"),
    }


def gateway(registry: Path, folder: Path) -> GatewayProcess:
    """One worker, the caller's environment less GATEWAY_* and OTEL_* (runs stay comparable), no admission."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    env |= {"GATEWAY_ADMISSION": "false", "GATEWAY_MAX_BODY_BYTES": str(64 << 20), "GATEWAY_MAX_WRITE_ROWS": "100000"}
    return GatewayProcess(registry, 1, env, folder / "gateway.log")


async def ingest_and_fetch(kind: str, args: argparse.Namespace) -> dict[str, float]:
    uid = uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gw = gateway(registry_file(kind, uid, folder), folder)
        rng = random.Random(1)
        now = time.time()
        bodies = [
            json.dumps({"events": [event(rng, f"{b}-{i}", now) for i in range(args.batch)]}).encode()
            for b in range(args.batches)
        ]
        gw.spawn()
        try:
            await gw.wait_ready()
            async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:

                async def lane(mine: list[bytes]) -> None:
                    for body in mine:
                        answer = await client.post(
                            "/v1/events/orders", content=body, headers={"content-type": "application/json"}
                        )
                        assert answer.status_code == 200, answer.text

                await lane(bodies[:1])  # warm: connections, the script, the plans
                cpu, started = gw.cpu_seconds(), time.perf_counter()
                lanes = args.concurrency
                await asyncio.gather(*(lane(bodies[1 + i :: lanes]) for i in range(lanes)))
                wall, cpu = time.perf_counter() - started, gw.cpu_seconds() - cpu
                rows = [{"consumer_id": i, **{f"f{j}": 1.0 for j in range(12)}} for i in range(100)]
                assert (await client.post("/v1/features/write", json={"group": "stored", "rows": rows})).is_success
                p50: dict[str, float] = {}
                for label, features in (("stored", ["stored:*"]), ("aggregates", ["agg:*"])) * 2:  # 2nd: measured
                    times = []
                    for _ in range(args.fetches):
                        body = {"entities": {"consumer_id": [rng.randrange(100)]}, "features": features}
                        at = time.perf_counter()
                        answer = await client.post("/v1/features/fetch", json=body)
                        times.append(time.perf_counter() - at)
                        assert answer.is_success, answer.text
                    p50[label] = statistics.median(times) * 1000
            gw.check_alive()
            stored = await storage_bytes(kind, uid, folder)
        finally:
            gw.stop()
            await cleanup(kind, uid)
    events = (args.batches - 1) * args.batch
    return {
        "events_per_s": events / wall,
        "events_per_cpu_s": events / cpu if cpu else float("nan"),
        "stored_p50_ms": p50["stored"],
        "aggregates_p50_ms": p50["aggregates"],
        "bytes_per_entity_aggregation": stored,
    }


async def storage_bytes(kind: str, uid: str, folder: Path) -> float:
    """Tile bytes per entity per aggregation (3 aggregations x 4 windows; ids of events are counted apart)."""
    if kind == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            total = 0
            for entity in range(200):  # an entity's tiles are one hash (backends/redis_tiles.py)
                total += int(await client.memory_usage(f"bench-streams:{uid}:~tiles:agg:{entity}", samples=0) or 0)
            return total / 200 / 3
        finally:
            await client.aclose()
    if kind == "postgres":
        conn = await asyncpg.connect(PG_DSN)
        try:
            table = f'"bs_{uid}"."feature_values_tiles"'
            size = await conn.fetchval(f"SELECT pg_total_relation_size('{table}')")
            entities = await conn.fetchval(f"SELECT count(DISTINCT entity_key) FROM {table} WHERE grp = 'agg'")
            return float(size) / max(1, int(entities)) / 3
        except asyncpg.PostgresError as exc:
            log(f"could not size the PostgreSQL tiles: {exc}")
            return float("nan")
        finally:
            await conn.close()
    import sqlite3

    with sqlite3.connect(folder / "bench.sqlite") as conn:
        row = conn.execute(
            "SELECT sum(length(partials) + length(entity_key) + 40), count(DISTINCT entity_key) FROM feature_tiles"
        ).fetchone()
    return float(row[0]) / max(1, int(row[1])) / 3


async def cleanup(kind: str, uid: str, keys: tuple[str, ...] = ()) -> None:
    if kind == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        found = [k async for k in client.scan_iter(match=f"bench-streams:{uid}:*", count=10_000)]
        found += list(keys)
        for start in range(0, len(found), 1000):
            await client.delete(*found[start : start + 1000])
        await client.aclose()
    elif kind == "postgres":
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "bs_{uid}" CASCADE')
        await conn.close()


class ConsumerProcess:
    def __init__(self, registry: Path, folder: Path, name: str) -> None:
        self.log = (folder / f"consumer-{name}.log").open("wb")
        command = [*gateway_command(), "consume", "--registry", str(registry), "--stream", "orders", "--name", name]
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
        )

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


async def group_info(client: aioredis.Redis, key: str) -> dict[str, Any]:
    groups = await client.xinfo_groups(key)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in groups[0].items()} if groups else {}


async def xadd_events(client: aioredis.Redis, key: str, events: list[dict[str, Any]]) -> None:
    pipe = client.pipeline(transaction=False)
    for e in events:
        pipe.xadd(key, e)  # type: ignore[arg-type]
    await pipe.execute()


async def consumer_row(args: argparse.Namespace) -> dict[str, float]:
    uid = uuid.uuid4().hex[:10]
    key = f"bench-streams:{uid}:stream"
    client = aioredis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        registry = registry_file("redis", uid, folder, key)
        rng, now = random.Random(2), time.time()
        for start in range(0, args.consumer_events, 5000):
            count = min(5000, args.consumer_events - start)
            await xadd_events(client, key, [event(rng, f"c{start + i}", now) for i in range(count)])
        consumer = ConsumerProcess(registry, folder, "bench")
        try:
            read_at_start = 0
            while True:  # from its first acknowledged batch (start-up and imports are not ingestion)
                info = await group_info(client, key)
                if info and int(info["entries-read"] or 0) > 0:
                    read_at_start = int(info["entries-read"]) - int(info["pending"])
                    break
                await asyncio.sleep(0.005)
            cpu, started = consumer.cpu_seconds(), time.perf_counter()
            while True:
                info = await group_info(client, key)
                if int(info["pending"]) == 0 and int(info["lag"] or 0) == 0:
                    break
                if consumer.proc.poll() is not None:
                    raise RuntimeError(f"the consumer exited; see {consumer.log.name}")
                await asyncio.sleep(0.01)
            wall, cpu = time.perf_counter() - started, consumer.cpu_seconds() - cpu
        finally:
            consumer.stop()
            await cleanup("redis", uid, (key,))
            await client.aclose()
    events = args.consumer_events - read_at_start
    return {"events_per_s": events / wall, "events_per_cpu_s": events / cpu if cpu else float("nan")}


async def freshness_row(args: argparse.Namespace) -> dict[str, float]:
    uid = uuid.uuid4().hex[:10]
    key = f"bench-streams:{uid}:stream"
    client = aioredis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        registry = registry_file("redis", uid, folder, key)
        gw = gateway(registry, folder)
        gw.spawn()
        consumer = ConsumerProcess(registry, folder, "fresh")
        latencies: list[float] = []
        sent = 0
        try:
            await gw.wait_ready()
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
                stop = asyncio.Event()
                rng = random.Random(3)

                async def produce() -> None:
                    nonlocal sent
                    tick, started = 0.01, time.perf_counter()
                    while not stop.is_set():
                        due = int((time.perf_counter() - started) * args.rate)
                        if due > sent:
                            now = time.time()
                            await xadd_events(client, key, [event(rng, f"p{sent + i}", now) for i in range(due - sent)])
                            sent = due
                        await asyncio.sleep(tick)

                async def probe(k: int) -> None:
                    entity = 1_000_000 + k
                    body = {"entities": {"consumer_id": [entity]}, "features": ["agg:n_10m"]}
                    at = time.perf_counter()
                    await client.xadd(key, {"consumer_id": entity, "ts": int(time.time() * 1000), "value": 1.0})
                    while True:
                        answer = (await http.post("/v1/features/fetch", json=body)).json()
                        if answer["rows"][0]["values"][0] == 1:
                            latencies.append(time.perf_counter() - at)
                            return
                        if time.perf_counter() - at > 10:
                            raise RuntimeError("a probe event was not served within 10 s")
                        await asyncio.sleep(0.002)

                producer = asyncio.create_task(produce())
                await asyncio.sleep(2)  # the consumer's start-up
                probes = []
                for k in range(int(args.seconds * 10)):
                    probes.append(asyncio.create_task(probe(k)))
                    await asyncio.sleep(0.1)
                await asyncio.gather(*probes)
                stop.set()
                await producer
                status = (await http.get("/v1/status")).json()["streams"]["orders"]
            gw.check_alive()
        finally:
            consumer.stop()
            gw.stop()
            await cleanup("redis", uid, (key, f"{key}:fg-consumers"))
            await client.aclose()
    latencies.sort()
    reported = status["event_to_servable"]["consumer"]
    log(f"freshness: {sent:,} events produced, consumer's own report: {reported}")
    return {
        "probes": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="redis,sqlite,postgres")
    parser.add_argument("--batches", type=int, default=41, help="POSTs (the first warms up)")
    parser.add_argument("--batch", type=int, default=1000, help="events per POST")
    parser.add_argument("--concurrency", type=int, default=4, help="POSTs in flight at once")
    parser.add_argument("--fetches", type=int, default=300)
    parser.add_argument("--consumer-events", type=int, default=60_000)
    parser.add_argument("--rate", type=int, default=5000, help="events/s for the freshness row")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--smoke", action="store_true", help="a few seconds of each row (CI: it runs, nothing judged)")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.fetches, args.consumer_events, args.seconds = 5, 20, 3000, 2
    print(
        "| backend | events/s (wall) | events per gateway CPU-s | 1 x 12 stored p50 ms | 1 x 12 aggregates p50 ms "
        "| ratio | bytes per entity per aggregation |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|")
    for kind in args.backends.split(","):
        r = asyncio.run(ingest_and_fetch(kind, args))
        ratio = r["aggregates_p50_ms"] / r["stored_p50_ms"]
        print(
            f"| {kind} | {r['events_per_s']:,.0f} | {r['events_per_cpu_s']:,.0f} | {r['stored_p50_ms']:.3f} | "
            f"{r['aggregates_p50_ms']:.3f} | {ratio:.2f}x | {r['bytes_per_entity_aggregation']:,.0f} |",
            flush=True,
        )
    c = asyncio.run(consumer_row(args))
    print(
        f"\nconsumer, Redis Streams -> Redis tiles: {c['events_per_s']:,.0f} events/s, "
        f"{c['events_per_cpu_s']:,.0f} per consumer CPU-s",
        flush=True,
    )
    f = asyncio.run(freshness_row(args))
    print(
        f"freshness at {args.rate:,} events/s: XADD to served p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, "
        f"max {f['max_ms']:.1f} ms ({f['probes']:.0f} probes)",
        flush=True,
    )


if __name__ == "__main__":
    main()
