"""The per-worker local cache (`local_cache_ms`): what it costs per key, and what it buys on a Zipf load.

    .venv/bin/python -m bench.local_cache [--micro-only] [--entities 100000] [--zipf 1.1] [--connections 32]
                                          [--seconds 10] [--warmup-seconds 3] [--workers 1] [--local-cache-ms 1000]
                                          [--skip-load] [--json FILE]

1. Micro: `LocalCache.read` in this process, no backend: a request of 2 groups x 1 key all hits, 2 groups x 100
   keys all hits, a miss (stamp noted, flight led, entry filled) per key, `Stamps.bump` per written key, and the
   bytes of Python objects per entry (tracemalloc).
2. Load: `live` (Redis, the shared server, key prefix `lcbench:`) and `history` (PostgreSQL, schema `fg_lcbench`),
   25 int64 + 25 float64 features each, `--entities` rows written through the backends' `write`. A gateway
   (`serve --workers N`, admission off so that every request is served and counted) without `local_cache_ms`,
   then one with it on both groups; wrk with bench/fetch.lua, `--connections` connections, closed loop, each
   request 1 entity x 100 features (`live:*`, `history:*`), ids Zipf(s) over the entities (ranks mapped to ids by
   a seeded permutation);
   `--warmup-seconds` unmeasured first. Every answer must be a 200 (`strict`: a degraded answer is a 503).
   The hit rate is read from `/metrics` (`feature_gateway_local_cache_lookups_total`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import httpx

from app.registry.load import load_registry
from app.registry.model import Group
from app.serving.local_cache import LocalCache, Stamps, read_through
from app.serving.statuses import BackendOutcome
from backends import open_backend
from backends.base import FeatureBackend, WriteRow
from bench.cache_tier import Zipf
from bench.procs import BenchError, GatewayProcess, ensure_wrk, log

if TYPE_CHECKING:
    from app.serving.gateway import Gateway
    from app.serving.generations import Generation

HERE = Path(__file__).parent
FEATURES = "\n".join(
    [f"      int_{i:02d}: {{dtype: int64, default: 0}}" for i in range(25)]
    + [f"      float_{i:02d}: {{dtype: float64, default: 0.0}}" for i in range(25)]
)


def registry_text(local_cache_ms: float | None, redis_url: str, pg_dsn: str) -> str:
    local = "" if local_cache_ms is None else f"\n    local_cache_ms: {local_cache_ms:g}"
    return f"""
backends:
  hot: {{type: redis, url: "{redis_url}", key_prefix: "lcbench:"}}
  bulk: {{type: cockroach, dsn: "{pg_dsn}", dialect: postgres, schema: fg_lcbench, table: history}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    ttl: 30d{local}
    features:
{FEATURES}
  history:
    entity: consumer
    backend: bulk
    ttl: 30d{local}
    features:
{FEATURES}
"""


# -- micro -------------------------------------------------------------------------------------------------


async def _per_call_us(fn: Any, n: int) -> float:
    """The best of 5 runs of `n` calls, per call."""
    for _ in range(min(n, 1000)):  # warm
        await fn()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


class _Answering:
    """A backend that answers every key with one blob at once: what is timed is the local cache alone."""

    def __init__(self, blob: bytes):
        self.blob = blob

    async def read(self, reads: list[tuple[Group, list[str]]]) -> list[list[bytes | None]]:
        return [[self.blob] * len(keys) for _, keys in reads]


async def micro(registry_path: Path) -> dict[str, float]:
    """Per call of `read_through` (what a fetch runs per backend when its groups have local_cache_ms) and of
    `LocalCache.held` (a fetch's path when every key is held), without a backend."""
    registry = load_registry(registry_path, {})
    live, history = registry.groups["live"], registry.groups["history"]
    blob = live.codec.encode(1, [1] * 25 + [1.5] * 25)
    backend = cast(FeatureBackend, _Answering(blob))
    out: dict[str, float] = {}

    def through(cache: LocalCache) -> Any:
        gw = cast("Gateway", SimpleNamespace(local_cache=cache))

        async def read(reads: Any) -> Any:
            return await read_through(gw, cast("Generation", None), backend, reads, None, None, BackendOutcome())

        return read

    cache = LocalCache()
    read = through(cache)
    for width in (1, 100):
        keys = [str(i) for i in range(width)]
        reads = [(live, keys), (history, keys)]
        await read(reads)  # filled

        async def hit(reads: Any = reads) -> None:
            await read(reads)

        async def held(reads: Any = reads) -> None:
            cache.held(reads)

        out[f"read_through_hit_2x{width}_us"] = await _per_call_us(hit, 20_000 // width)
        out[f"held_2x{width}_us"] = await _per_call_us(held, 20_000 // width)

    counter = iter(range(10**9))

    async def miss() -> None:
        await read([(live, [str(next(counter))])])

    async def plain() -> None:
        await backend.read([(live, [str(next(counter))])])

    out["read_through_miss_1_key_us"] = await _per_call_us(miss, 20_000)
    out["backend_alone_1_key_us"] = await _per_call_us(plain, 20_000)
    stamps = Stamps()
    keys = [str(i) for i in range(100)]

    async def bump() -> None:
        stamps.bump("live", keys)

    out["bump_per_key_us"] = await _per_call_us(bump, 2000) / 100

    fresh = LocalCache()
    tracemalloc.start()
    n = 20_000
    keys = [str(10**6 + i) for i in range(n)]
    before = tracemalloc.get_traced_memory()[0]
    await through(fresh)([(live, keys)])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    out["python_bytes_per_entry_beyond_blob"] = used / n - len(blob)
    out["accounted_bytes_per_entry"] = fresh.bytes / n - len(blob)
    return out


# -- load --------------------------------------------------------------------------------------------------


async def load(registry_path: Path, entities: int) -> float:
    registry = load_registry(registry_path, {})
    started = time.perf_counter()
    for name in ("live", "history"):
        group = registry.groups[name]
        backend = open_backend(registry.backends[group.backend], registry)
        try:
            await backend.migrate()
            now_us = time.time_ns() // 1000
            pending: set[asyncio.Task[Any]] = set()
            for start in range(1, entities + 1, 1000):
                rows = [
                    WriteRow(str(i), now_us, group.codec.encode(now_us, [i % 1000] * 25 + [i * 0.5] * 25))
                    for i in range(start, min(start + 1000, entities + 1))
                ]
                pending.add(asyncio.create_task(backend.write(group, rows)))
                if len(pending) >= 4:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
            for task in pending:
                await task
        finally:
            await backend.aclose()
    return time.perf_counter() - started


def draw_ids(path: Path, zipf: Zipf, n: int) -> None:
    """The Zipf ids the requests take in turn (bench/fetch.lua's IDS file, as the main bench's Zipf rows use)."""
    path.write_text("".join(f"{entity}\n" for entity in zipf.draw(n).tolist()))


def wrk(url: str, ids_path: Path, connections: int, seconds: float) -> dict[str, Any]:
    command = [
        ensure_wrk(),
        "-t2",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "fetch.lua"),
        f"{url}/v1/features/fetch",
        "--",
        *("1", "1", "1", "1", "1", "consumer_id", '"features":["live:*","history:*"]', "1000", "", ""),
        str(ids_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"^BENCH_JSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        raise BenchError(f"wrk failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    answer = json.loads(found[1])
    seconds_run = answer["duration_us"] / 1e6
    return {
        "requests": answer["requests"],
        "seconds": seconds_run,
        "non200": answer["non200"],
        "errors": sum(answer["errors"][k] for k in ("connect", "read", "write", "timeout")),
        "p50_us": answer["latency_us"]["p50"],
        "p99_us": answer["latency_us"]["p99"],
        "rps": answer["requests"] / seconds_run,
    }


async def lookups(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    counts: dict[str, float] = {"hit": 0.0, "miss": 0.0, "coalesced": 0.0}
    for line in text.splitlines():
        if line.startswith("feature_gateway_local_cache_lookups_total{"):
            result = re.search(r'result="(\w+)"', line)
            assert result is not None
            counts[result[1]] += float(line.rsplit(" ", 1)[1])
    return counts


async def run_gateway(args: argparse.Namespace, registry_path: Path, ids_path: Path, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "GATEWAY_ADMISSION": "false"}
    env.pop("GATEWAY_METRICS_DIR", None)
    gateway = GatewayProcess(registry_path, args.workers, env, tmp / f"{registry_path.stem}.log")
    gateway.spawn()
    try:
        await gateway.wait_ready()
        if args.warmup_seconds:
            wrk(gateway.url, ids_path, args.connections, args.warmup_seconds)
        before = await lookups(gateway.url)
        await asyncio.sleep(1.2 if args.workers > 1 else 0)  # (workers' snapshots are rewritten every second)
        result = wrk(gateway.url, ids_path, args.connections, args.seconds)
        await asyncio.sleep(1.2 if args.workers > 1 else 0)
        after = await lookups(gateway.url)
        gateway.check_alive()
        delta = {k: after[k] - before[k] for k in after}
        total = sum(delta.values())
        result["hit_rate"] = delta["hit"] / total if total else None
        result["coalesced_rate"] = delta["coalesced"] / total if total else None
        if result["non200"] or result["errors"]:
            raise BenchError(f"{result['non200']} non-200 answers, {result['errors']} socket errors: {result}")
        return result
    finally:
        gateway.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    pg_dsn = os.environ.get("BENCH_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
    out: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-local-cache-") as scratch:
        tmp = Path(scratch)
        off, on = tmp / "off.yaml", tmp / "on.yaml"
        off.write_text(registry_text(None, redis_url, pg_dsn))
        on.write_text(registry_text(args.local_cache_ms, redis_url, pg_dsn))
        out["micro"] = await micro(on)
        log(f"micro: {out['micro']}")
        if args.micro_only:
            return out
        if not args.skip_load:
            log(f"loading {args.entities:,} entities into Redis and PostgreSQL")
            out["load_s"] = await load(off, args.entities)
        ids_path = tmp / "ids.txt"
        draw_ids(ids_path, Zipf(args.entities, args.zipf, args.seed), args.bodies)
        for name, path in (("without", off), ("with", on)):
            log(f"{name} local_cache_ms: {args.connections} connections, {args.seconds:g} s")
            out[name] = await run_gateway(args, path, ids_path, tmp)
            log(f"{name}: {out[name]}")
        out["speedup"] = out["with"]["rps"] / out["without"]["rps"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-only", action="store_true")
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bodies", type=int, default=100_000, help="Zipf draws the requests take in turn")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup-seconds", type=float, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--local-cache-ms", type=float, default=1000)
    parser.add_argument("--skip-load", action="store_true", help="the rows are there from an earlier run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        out = asyncio.run(main_async(args))
    except BenchError as exc:
        print(f"bench.local_cache: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
