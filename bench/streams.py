"""Streaming aggregations (issue 13), measured in-process per backend: events through `POST /v1/events/{stream}`
in batches, and a fetch of 1 entity x 12 aggregate features against 12 stored features on the same backend.

    .venv/bin/python -m bench.streams [--backends redis,sqlite,postgres] [--batches 20] [--batch 1000] [--fetches 300]

The app is called over httpx's ASGI transport (no network; the client's own work is in the timing, the same for
every row). Events: 10,000 entities, times in the last 4 minutes, 3 aggregations x 4 windows (10m, 1h, 1d, 7d).
Redis and PostgreSQL are this machine's servers (a key prefix and a schema of their own, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.main import create_app
from app.registry.load import parse_registry
from app.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "postgresql://root@127.0.0.1:5432/test"
STORED = "".join(f"      f{i}: {{dtype: float64, default: 0.0}}\n" for i in range(12))
REGISTRY = """
backends:
  hot: {backend}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
streams:
  orders: {{entity: consumer, event_time: ts, fields: {{value: float64, cuisine: string}}}}
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
        return f'{{type: redis, url: "{REDIS_URL}", key_prefix: "bench-streams:{uid}:"}}'
    if kind == "postgres":
        return f'{{type: cockroach, dsn: "{PG_DSN}", schema: bs_{uid}, dialect: postgres}}'
    return f'{{type: sqlite, path: "{folder / "bench.sqlite"}"}}'


async def measure(kind: str, args: argparse.Namespace) -> dict[str, float]:
    uid = uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory() as folder:
        registry = parse_registry(REGISTRY.format(backend=backend(kind, uid, Path(folder)), stored=STORED), "bench")
        settings = Settings(admission=False, freeze_heap=False, max_body_bytes=64 << 20, max_write_rows=100_000)
        app = create_app(settings, registry=registry)
        rng = random.Random(1)
        now = time.time()
        bodies = [
            json.dumps(
                {
                    "events": [
                        {
                            "event_id": f"{b}-{i}",
                            "consumer_id": rng.randrange(10_000),
                            "ts": int((now - rng.random() * 240) * 1000),
                            "value": rng.random() * 50,
                            "cuisine": rng.choice("abcdef"),
                        }
                        for i in range(args.batch)
                    ]
                }
            ).encode()
            for b in range(args.batches)
        ]
        headers = {"content-type": "application/json"}
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
                    started, cpu = time.perf_counter(), time.process_time()
                    for body in bodies:
                        answer = await client.post("/v1/events/orders", content=body, headers=headers)
                        assert answer.status_code == 200, answer.text
                    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                    rows = [{"consumer_id": i, **{f"f{j}": 1.0 for j in range(12)}} for i in range(100)]
                    assert (await client.post("/v1/features/write", json={"group": "stored", "rows": rows})).is_success
                    p50: dict[str, float] = {}
                    for label, features in (("stored", ["stored:*"]), ("aggregates", ["agg:*"])):
                        times = []
                        for _ in range(args.fetches):
                            fetch = {"entities": {"consumer_id": [rng.randrange(100)]}, "features": features}
                            at = time.perf_counter()
                            assert (await client.post("/v1/features/fetch", json=fetch)).is_success
                            times.append(time.perf_counter() - at)
                        p50[label] = statistics.median(times) * 1000
        finally:
            await cleanup(kind, uid)
    events = args.batches * args.batch
    return {
        "events_per_s": events / wall,
        "events_per_cpu_s": events / cpu,
        "stored_p50_ms": p50["stored"],
        "aggregates_p50_ms": p50["aggregates"],
    }


async def cleanup(kind: str, uid: str) -> None:
    if kind == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"bench-streams:{uid}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()
    elif kind == "postgres":
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "bs_{uid}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="redis,sqlite,postgres")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000, help="events per POST")
    parser.add_argument("--fetches", type=int, default=300)
    args = parser.parse_args()
    print("| backend | events/s (wall) | events per CPU-s | 1 x 12 stored p50 ms | 1 x 12 aggregates p50 ms | ratio |")
    print("|---|--:|--:|--:|--:|--:|")
    for kind in args.backends.split(","):
        r = asyncio.run(measure(kind, args))
        ratio = r["aggregates_p50_ms"] / r["stored_p50_ms"]
        print(
            f"| {kind} | {r['events_per_s']:,.0f} | {r['events_per_cpu_s']:,.0f} | {r['stored_p50_ms']:.3f} | "
            f"{r['aggregates_p50_ms']:.3f} | {ratio:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
