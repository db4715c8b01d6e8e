"""The cache tier's row (issue 14): Zipf reads of a PostgreSQL group through a Redis cache sized for a tenth of
it, against the same group held wholly in Redis, in one gateway session.

    .venv/bin/python -m bench.cache_tier [--entities 1000000] [--cache-fraction 0.10] [--zipf 1.1]
                                         [--rounds 5] [--seconds 4] [--requests 20000] [--sizes 1,10]
                                         [--smoke] [--json FILE]

1. Two redis-servers of our own (nothing on disk): `hot` holds group `history_hot` whole, `cache` is the cache of
   group `history`, whose system of record is PostgreSQL (`type: cockroach, dialect: postgres`, a schema of our
   own). Both groups: entity `consumer`, int64 ids 1..N, 25 int64 + 25 float64 features, ttl 30d. The N rows are
   encoded once (the registry's codec) and written straight through both backends' `write` in batches, several in
   flight: the HTTP write path would spend minutes on JSON for 1M rows and is not what is measured here. A sample
   is read back through the gateway, value by value, from both groups.
2. The cache's `maxmemory` is `--cache-fraction` x the data's bytes on `hot` (used_memory after loading less
   before), plus the cache server's own baseline, with `allkeys-lru`.
3. One gateway worker. Warm-up: Zipf(s) draws (ranks mapped to ids by a seeded permutation), 200 ids x 1 feature
   per request on 3 connections (a promotion copies the whole blob whatever was asked), until the cache is full
   and the hit rate of successive chunks moves by less than half a point. Then `--rounds` rounds, each a run of
   `--seconds` per size and group, the two groups alternating (the first one swapped each round), one
   connection, closed loop, 50 features per entity; each run's requests are Zipf draws built up front and sent
   over a raw socket (the client's cost stays out of the timing, and is a few microseconds per request).
4. Hit rate over the measured runs from `/metrics` (`feature_gateway_cache_lookups_total`) deltas, against the
   cache server's `keyspace_hits`; round trips from the cache server's `cmdstat_mget` and the table's
   `pg_stat_user_tables.idx_scan` deltas against requests and requests with a miss (each request's
   `Server-Timing` says how many of its keys hit). Then `--miss-requests` requests for ids never drawn (all
   misses): their p50 against the hits' and against the raw PostgreSQL read (asyncpg, the gateway's statement).

Every answer must be a 200 (`"strict": true`: a degraded one is a 503) without a MISSING value; every 16th is
checked value by value. Any failure exits 1 after printing what was measured, never a number (`--smoke`, CI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis

from app.registry.load import load_registry
from app.registry.model import Group, Registry
from backends import open_backend
from backends.base import FeatureBackend, WriteRow
from backends.cockroach import CockroachBackend
from bench.measure import percentile, redis_data_memory
from bench.procs import BenchError, GatewayProcess, RedisServer, log

PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
JOIN_KEY = "consumer_id"
INTS = FLOATS = 25
FEATURES = [f"int_{i:02d}" for i in range(INTS)] + [f"float_{i:02d}" for i in range(FLOATS)]
CACHED, HOT = "history", "history_hot"
CHECK_EVERY = 16  # every 16th measured answer is compared value by value (the rest: status and MISSING only)
WARM_IDS = 200  # ids per warm-up request
WARM_CHUNK_DRAWS = 200_000  # the hit rate is compared chunk by chunk

_FEATURE_LINES = "".join(f"      int_{i:02d}: {{dtype: int64, default: 0}}\n" for i in range(INTS)) + "".join(
    f"      float_{i:02d}: {{dtype: float64, default: 0.0}}\n" for i in range(FLOATS)
)
REGISTRY = """# bench/cache_tier.py: written for one run
backends:
  bulk:
    type: cockroach
    dsn: "{dsn}"
    dialect: postgres
    schema: "{schema}"
    table: history
    timeout_ms: 5000
    cleanup_interval: 1d   # the reclaim loop's DELETEs would show in the table's idx_scan
    cost_per_gb_month: 0.25
  cache: {{type: redis, url: "{cache_url}", key_prefix: "fg:", cost_per_gb_month: 8.0}}
  hot: {{type: redis, url: "{hot_url}", key_prefix: "fg:", cost_per_gb_month: 8.0}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  history:
    entity: consumer
    backend: bulk
    ttl: 30d
    cache: {{backend: cache, ttl: 1h}}
    features:
{features}
  history_hot:
    entity: consumer
    backend: hot
    ttl: 30d
    features:
{features}"""


# -- the data: a function of the id, so any answer can be checked without keeping 50M values ------------------


def values_of(ids: npt.NDArray[np.int64]) -> list[list[Any]]:
    """Per id, its 50 values in registry order: ints spread over 0..999 (10 bits each, as the main bench's
    uniform draws), floats k / 2^22 in [0, 1024) (exact in JSON), both hashed from the id."""
    j = np.arange(INTS, dtype=np.int64)
    ints = ((ids[:, None] * 2654435761 + j[None, :] * 40503) >> 7) % 1000
    floats = (((ids[:, None] * 1000003 + j[None, :] * 7919) * 2654435761) % (1 << 32)) / float(1 << 22)
    rows: list[list[Any]] = np.concatenate([ints.astype(object), floats.astype(object)], axis=1).tolist()
    return rows


def expected(entity: int) -> list[Any]:
    return values_of(np.array([entity], dtype=np.int64))[0]


# -- Zipf draws ----------------------------------------------------------------------------------------------


class Zipf:
    """Ids drawn with P(rank k) ~ 1/k^s over N ranks, ranks mapped to ids by a seeded permutation (so the hot
    ids are spread over the key space and the table). Keeps every id drawn, to pick never-read ones later."""

    def __init__(self, entities: int, s: float, seed: int):
        self.rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, entities + 1, dtype=np.float64) ** s
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.ids = self.rng.permutation(entities).astype(np.int64) + 1  # rank k (0-based) -> id
        self.drawn = np.zeros(entities + 1, dtype=bool)

    def draw(self, n: int) -> npt.NDArray[np.int64]:
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), len(self.cdf) - 1)
        ids: npt.NDArray[np.int64] = self.ids[ranks]
        self.drawn[ids] = True
        return ids

    def never_drawn(self, n: int) -> list[int]:
        cold = np.flatnonzero(~self.drawn[1:]) + 1
        picked = self.rng.choice(cold, size=min(n, len(cold)), replace=False)
        self.drawn[picked] = True
        return [int(i) for i in picked]


# -- loading -------------------------------------------------------------------------------------------------


async def load(registry: Registry, entities: int, batch: int, event_us: int) -> dict[str, float]:
    """Every row into PostgreSQL (`history`) and the hot Redis (`history_hot`) through the backends' `write`."""
    bulk = open_backend(registry.backends["bulk"], registry)
    hot = open_backend(registry.backends["hot"], registry)
    cached, hot_group = registry.groups[CACHED], registry.groups[HOT]
    encode = cached.codec.encode  # the same 50 dtypes: one blob serves both groups
    pending: set[asyncio.Task[None]] = set()
    problems: list[str] = []
    started = time.perf_counter()

    async def write(backend: FeatureBackend, group: Group, rows: list[WriteRow]) -> None:
        result = await backend.write(group, rows)
        if result.written != len(rows):
            problems.append(f"{group.name}: {result.written} of {len(rows)} rows written")

    try:
        await bulk.migrate()
        for start in range(1, entities + 1, batch):
            ids = np.arange(start, min(start + batch, entities + 1), dtype=np.int64)
            rows = [
                WriteRow(str(i), event_us, encode(event_us, v))
                for i, v in zip(ids.tolist(), values_of(ids), strict=True)
            ]
            for backend, group in ((bulk, cached), (hot, hot_group)):
                task = asyncio.create_task(write(backend, group, rows))
                pending.add(task)
                task.add_done_callback(pending.discard)
            # Encoding the next batch overlaps the writes in flight; a few batches ahead at most.
            while len(pending) > 6:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if problems:
                raise BenchError(f"loading: {problems[0]}")
            if start // batch % 100 == 0 and start > 1:
                log(f"loaded {start - 1:,} of {entities:,} rows ({time.perf_counter() - started:.0f} s)")
        await asyncio.gather(*pending)
        if problems:
            raise BenchError(f"loading: {problems[0]}")
        loaded_s = time.perf_counter() - started
        assert isinstance(bulk, CockroachBackend)
        pool = await bulk.pool()
        await pool.execute(f"VACUUM ANALYZE {bulk.table}")  # a fresh table's planner stats and visibility map
        return {"load_s": loaded_s, "vacuum_s": time.perf_counter() - started - loaded_s}
    finally:
        for task in pending:
            task.cancel()
        await bulk.aclose()
        await hot.aclose()


# -- the client ----------------------------------------------------------------------------------------------


_TIMING = re.compile(rb'cache (\d+) hit (\d+) miss"')  # Server-Timing of the cache's read (routers/answers.py)
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


class Http1:
    """One keep-alive HTTP/1.1 connection, blocking: a pre-built request out, the answer read by Content-Length.
    A few microseconds of Python per request, so one connection's latency is the gateway's, not the client's."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(30)
        self.buf = b""

    def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        """(status, head, body)"""
        self.sock.sendall(request)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("the gateway closed the connection")
            buf += chunk
        head = buf[:end]
        found = _LENGTH.search(head)
        if found is None:
            raise BenchError(f"an answer without Content-Length: {head[:300]!r}")
        length = int(found[1])
        body_end = end + 4 + length
        while len(buf) < body_end:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("the gateway closed the connection")
            buf += chunk
        self.buf = buf[body_end:]
        return int(head[9:12]), head, buf[end + 4 : body_end]

    def close(self) -> None:
        self.sock.close()


def fetch_request(group: str, ids: Sequence[int], features: str = "*", deadline_ms: int = 1000) -> bytes:
    body = (
        f'{{"entities":{{"{JOIN_KEY}":[{",".join(map(str, ids))}]}},"features":["{group}:{features}"],'
        f'"deadline_ms":{deadline_ms},"strict":true}}'
    ).encode()
    return (
        b"POST /v1/features/fetch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def check_answer(body: bytes, ids: Sequence[int]) -> str | None:
    """What is wrong with an answer of 50 features for `ids` (None: every value PRESENT and as written)."""
    answer = json.loads(body)
    for entity, row in zip(ids, answer["rows"], strict=True):
        if row["entity"] != {JOIN_KEY: entity}:
            return f"rows out of order at {entity}"
        if set(row["statuses"]) != {"PRESENT"}:
            return f"{JOIN_KEY}={entity} has statuses {set(row['statuses'])}"
        if row["values"] != expected(entity):
            return f"{JOIN_KEY}={entity} has other values than were written"
    return None


@dataclass
class Run:
    """One closed-loop run of one group and size: latencies (ms), and per request its cache misses."""

    group: str
    entities: int
    round: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)  # per request (cached group only; -1 when not told)
    gateway_cpu_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "requests": self.requests,
            "rps": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "cpu_ms_per_request": self.gateway_cpu_s * 1000 / self.requests if self.requests else 0.0,
        }


def send(conn: Http1, run: Run, request: bytes, ids: Sequence[int], check: bool) -> bool:
    """One request, timed from sending it to the answer's last byte; False (and the failure kept) when wrong."""
    at = time.perf_counter_ns()
    status, head, body = conn.exchange(request)
    took = time.perf_counter_ns() - at
    if status != 200:
        run.failures.append(f"{run.group} x {run.entities}: HTTP {status}: {body[:300]!r}")
        return False
    if b'"MISSING"' in body or b'"EXPIRED"' in body:
        run.failures.append(f"{run.group} x {run.entities}: a value MISSING or EXPIRED: {body[:300]!r}")
        return False
    run.latencies_ms.append(took / 1e6)
    if run.group == CACHED:
        found = _TIMING.search(head)
        run.misses.append(int(found[2]) if found else -1)
    if check and (wrong := check_answer(body, ids)):
        run.failures.append(f"{run.group} x {run.entities}: {wrong}")
        return False
    return True


def closed_loop(conn: Http1, run: Run, batches: Sequence[Sequence[int]], seconds: float, gw: GatewayProcess) -> None:
    """Send the pre-built requests one at a time until `seconds` pass or they run out."""
    requests = [fetch_request(run.group, ids) for ids in batches]
    cpu = gw.cpu_seconds()
    started = time.perf_counter()
    end = started + seconds
    for n, (request, ids) in enumerate(zip(requests, batches, strict=True)):
        if not send(conn, run, request, ids, check=n % CHECK_EVERY == 0):
            break
        if n % 64 == 0 and time.perf_counter() > end:
            break
    run.seconds = time.perf_counter() - started
    run.gateway_cpu_s = gw.cpu_seconds() - cpu


# -- what the servers count ----------------------------------------------------------------------------------


Counts = dict[str, float]


async def counters(client: httpx.AsyncClient, *servers: aioredis.Redis) -> list[Counts]:
    """The gateway's cache counters, then each Redis server's."""
    return [await metrics(client)] + [dict(await redis_counts(server)) for server in servers]


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The gateway's cache counters of group `history`, by family and result."""
    text = (await client.get("/metrics")).text
    found: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith("feature_gateway_cache_") and f'group="{CACHED}"' in line:
            name = line[len("feature_gateway_cache_") : line.index("{")]
            result = line[line.index('result="') + 8 :].split('"', 1)[0]
            found[f"{name}:{result}"] += float(line.rsplit(" ", 1)[1])
    return found


async def redis_counts(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("stats")
    commands = await client.info("commandstats")
    out = {k: int(stats[k]) for k in ("keyspace_hits", "keyspace_misses", "evicted_keys")}
    for command in ("mget", "evalsha", "eval"):
        out[command] = int(commands.get(f"cmdstat_{command}", {}).get("calls", 0))
    return out


async def pg_counts(conn: asyncpg.Connection, schema: str, settle_s: float) -> dict[str, int]:
    """Scans of our table's index, once the gateway's sessions have reported them. PostgreSQL 15 flushes a
    session's counters at most once a second while busy and 10 s after it goes idle (pgstat's
    PGSTAT_IDLE_INTERVAL), so a count is only whole `settle_s` >= 11 s after the last statement. A btree scan
    for `= ANY(array)` counts once per array element here, so the scans equal the keys read, and for one-key
    requests the statements. Nothing when `settle_s` is 0 (--smoke)."""
    if not settle_s:
        return {}
    await asyncio.sleep(settle_s)
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT idx_scan, seq_scan FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'history'", schema
    )
    return {"idx_scan": int(row["idx_scan"] or 0), "seq_scan": int(row["seq_scan"] or 0)}


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


async def pg_floor(schema: str, ids: Sequence[int]) -> float:
    """p50 (ms) of the gateway's SELECT for one key, sent directly with asyncpg: what a miss adds at least."""
    # CockroachBackend._read_statement(1) for the table of REGISTRY
    statement = (
        f'SELECT 0 AS i, entity_key, payload FROM "{schema}"."history" WHERE grp = $1 AND entity_key = ANY($2::text[])'
    )
    conn = await asyncpg.connect(PG_DSN)
    try:
        times = []
        for i in ids:
            at = time.perf_counter_ns()
            rows = await conn.fetch(statement, CACHED, [str(i)])
            times.append((time.perf_counter_ns() - at) / 1e6)
            if len(rows) != 1:
                raise BenchError(f"the floor's SELECT found {len(rows)} rows for {i}")
        return statistics.median(times[len(times) // 10 :])  # the first tenth warms the connection
    finally:
        await conn.close()


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Servers:
    hot: RedisServer
    cache: RedisServer
    schema: str


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def verify(client: httpx.AsyncClient, entities: int, seed: int) -> None:
    """50 random ids (among them the first and last), every feature of both groups: PRESENT and as written."""
    rng = random.Random(f"{seed}:verify")
    ids = sorted({1, entities, *rng.sample(range(1, entities + 1), min(48, entities))})
    for group in (CACHED, HOT):
        answer = await client.post(
            "/v1/features/fetch",
            json={"entities": {JOIN_KEY: ids}, "features": [f"{group}:*"], "deadline_ms": 5000, "strict": True},
        )
        if answer.status_code != 200:
            raise BenchError(f"reading back {group}: HTTP {answer.status_code}: {answer.text[:300]}")
        if wrong := check_answer(answer.content, ids):
            raise BenchError(f"reading back {group}: {wrong}")


async def warm_up(
    gw: GatewayProcess, client: httpx.AsyncClient, zipf: Zipf, cache: aioredis.Redis, max_s: float
) -> list[dict[str, float]]:
    """Zipf draws through the gateway until the cache is full and the hit rate holds still (or `max_s`)."""
    chunks: list[dict[str, float]] = []
    started = time.perf_counter()
    requests_per_chunk = max(1, WARM_CHUNK_DRAWS // WARM_IDS)

    async def lane(bodies: list[bytes]) -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as own:
            for body in bodies:
                answer = await own.post(
                    "/v1/features/fetch", content=body, headers={"content-type": "application/json"}
                )
                if answer.status_code != 200:
                    raise BenchError(f"warm-up: HTTP {answer.status_code}: {answer.text[:300]}")

    while True:
        before = await metrics(client)
        bodies = [
            json.dumps(
                {
                    "entities": {JOIN_KEY: zipf.draw(WARM_IDS).tolist()},
                    "features": [f"{CACHED}:int_00"],
                    "deadline_ms": 5000,
                    "strict": True,
                }
            ).encode()
            for _ in range(requests_per_chunk)
        ]
        await asyncio.gather(*(lane(bodies[i::3]) for i in range(3)))
        d = delta(await metrics(client), before)
        looked = d.get("lookups_total:hit", 0) + d.get("lookups_total:miss", 0)
        evicted = (await redis_counts(cache))["evicted_keys"]
        chunk = {
            "hit_rate": d.get("lookups_total:hit", 0) / looked if looked else 0.0,
            "dropped": d.get("promotions_total:dropped", 0),
            "evicted_keys": evicted,
            "elapsed_s": time.perf_counter() - started,
        }
        chunks.append(chunk)
        log(
            f"warm-up: {len(chunks) * requests_per_chunk * WARM_IDS:,} draws, chunk hit rate "
            f"{chunk['hit_rate']:.2%}, evicted {evicted:,}, {chunk['elapsed_s']:.0f} s"
        )
        gw.check_alive()
        steady = len(chunks) >= 3 and all(
            abs(chunks[-k]["hit_rate"] - chunks[-k - 1]["hit_rate"]) < 0.005 for k in (1, 2)
        )
        if (evicted and steady) or time.perf_counter() - started > max_s:
            return chunks


async def bench(args: argparse.Namespace, servers: Servers, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"args": vars(args)}
    registry_path = folder / "registry.yaml"
    registry_path.write_text(
        REGISTRY.format(
            dsn=PG_DSN,
            schema=servers.schema,
            cache_url=servers.cache.url,
            hot_url=servers.hot.url,
            features=_FEATURE_LINES,
        )
    )
    registry = load_registry(registry_path)
    hot = aioredis.Redis.from_url(servers.hot.url)
    cache = aioredis.Redis.from_url(servers.cache.url)
    pg = await asyncpg.connect(PG_DSN)
    gw: GatewayProcess | None = None
    try:
        hot_empty = await redis_data_memory(hot, settle_s=1)
        log(f"loading {args.entities:,} rows into PostgreSQL ({servers.schema}) and Redis :{servers.hot.port}")
        out["load"] = await load(registry, args.entities, args.batch, (time.time_ns() // 1000) - 60_000_000)
        log(f"loaded in {out['load']['load_s']:.1f} s (+ VACUUM ANALYZE {out['load']['vacuum_s']:.1f} s)")
        hot_data = await redis_data_memory(hot) - hot_empty
        cache_empty = await redis_data_memory(cache, settle_s=1)
        maxmemory = int(hot_data * args.cache_fraction) + int((await cache.info("memory"))["used_memory"])
        await cache.config_set("maxmemory", str(maxmemory))
        await cache.config_set("maxmemory-policy", "allkeys-lru")
        out["sizing"] = {
            "hot_data_bytes": hot_data,
            "bytes_per_entity": hot_data / args.entities,
            "cache_baseline_bytes": cache_empty,
            "cache_maxmemory": maxmemory,
        }
        log(f"history_hot: {hot_data / args.entities:.1f} B/entity; cache maxmemory {maxmemory / 2**20:.1f} MiB")

        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
        env["GATEWAY_ADMISSION"] = "false"  # one connection measures latency, never admission's refusals
        gw = GatewayProcess(registry_path, 1, env, folder / "gateway.log")
        gw.spawn()
        await gw.wait_ready()
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            await verify(client, args.entities, args.seed)
            log("a sample of both groups read back as written")
            zipf = Zipf(args.entities, args.zipf, args.seed)
            out["warmup"] = await warm_up(gw, client, zipf, cache, args.warmup_seconds)
            out["runs"], out["counts"] = await measure(args, gw, client, zipf, cache, hot, pg, servers.schema)
            gw.check_alive()
            out["miss"] = await cold(args, gw, client, zipf, cache, hot, pg, servers.schema)
            gw.check_alive()
            # The cost report of the bench data (GET /v1/cost, as `feature-gateway cost` prints it), after the runs
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "cost", "--url", gw.url, "--timeout", "120",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            printed, errors = await cli.communicate()
            if cli.returncode != 0:
                raise BenchError(f"feature-gateway cost failed: {errors.decode()[-500:]}")
            out["cost_table"] = printed.decode()
            log(f"cost report of the bench data:\n{out['cost_table']}")
        out["pg_floor_p50_ms"] = await pg_floor(servers.schema, zipf.draw(300).tolist())
        cache_info, hot_info = await cache.info("memory"), await hot.info("memory")
        out["memory"] = {
            "cache_used_memory": int(cache_info["used_memory"]),
            "hot_used_memory": int(hot_info["used_memory"]),
            "cache_data_bytes": await redis_data_memory(cache, settle_s=1) - cache_empty,
            "hot_data_bytes": hot_data,
            "cache_keys": int(await cache.dbsize()),
            "hot_keys": int(await hot.dbsize()),
            "cache_evicted_keys": (await redis_counts(cache))["evicted_keys"],
        }
        return out
    finally:
        if gw is not None:
            gw.stop()
        await hot.aclose()
        await cache.aclose()
        await pg.close()


async def measure(
    args: argparse.Namespace,
    gw: GatewayProcess,
    client: httpx.AsyncClient,
    zipf: Zipf,
    cache: aioredis.Redis,
    hot: aioredis.Redis,
    pg: asyncpg.Connection,
    schema: str,
) -> tuple[list[Run], dict[str, dict[str, float]]]:
    """The interleaved rounds; per group the servers' counters summed over its runs (deltas around each)."""
    runs: list[Run] = []
    counts: dict[str, dict[str, float]] = {CACHED: defaultdict(float), HOT: defaultdict(float)}
    # Around the whole period, not each run: a whole count takes 11 s to settle. Only `history` reads the table.
    pg_before = await pg_counts(pg, schema, args.pg_settle)
    conn = Http1(gw.port)
    try:
        for r in range(args.rounds):
            for size in args.sizes:
                order = (CACHED, HOT) if r % 2 == 0 else (HOT, CACHED)
                for group in order:
                    batches = [zipf.draw(size).tolist() for _ in range(args.requests)]
                    before = await counters(client, cache, hot)
                    run = Run(group, size, r)
                    closed_loop(conn, run, batches, args.seconds, gw)
                    after = await counters(client, cache, hot)
                    total = counts[group]
                    for prefix, d in zip(
                        ("gw", "cache", "hot"), (delta(a, b) for a, b in zip(after, before, strict=True)), strict=True
                    ):
                        for k, v in d.items():
                            total[f"{prefix}.{k}"] += v
                    total["requests"] += run.requests
                    total["requests_with_miss"] += sum(1 for m in run.misses if m > 0)
                    total["keys_missed"] += sum(m for m in run.misses if m > 0)
                    runs.append(run)
                    s = run.summary()
                    log(
                        f"round {r + 1} {group} x {size}: {s['rps']:,.0f} req/s, p50 {s['p50_ms']:.3f} ms, "
                        f"p99 {s['p99_ms']:.3f} ms ({run.requests} requests)"
                    )
                    if run.failures:
                        return runs, counts
    finally:
        conn.close()
    for k, v in delta(await pg_counts(pg, schema, args.pg_settle), pg_before).items():
        counts[CACHED][f"pg.{k}"] += v
    return runs, counts


async def cold(
    args: argparse.Namespace,
    gw: GatewayProcess,
    client: httpx.AsyncClient,
    zipf: Zipf,
    cache: aioredis.Redis,
    hot: aioredis.Redis,
    pg: asyncpg.Connection,
    schema: str,
) -> dict[str, Any]:
    """What a miss costs: requests for ids never read (every key a miss) alternating with requests for the most
    drawn id (a hit), 1 entity each, 2 ms apart. The pause lets the miss's promotion (a script call, in the same
    event loop) finish before the next request, which the closed-loop runs do not: there a request after a
    miss also waits for that. Counted: what the cache server and the table saw per request."""
    ids = zipf.never_drawn(args.miss_requests)
    top = int(zipf.ids[0])
    misses, hits = Run(CACHED, 1, -1), Run(CACHED, 1, -1)
    before = await counters(client, cache, hot)
    pg_before = await pg_counts(pg, schema, args.pg_settle)
    conn = Http1(gw.port)
    try:
        hit_request = fetch_request(CACHED, [top])
        for n, entity in enumerate(ids):
            if not send(conn, misses, fetch_request(CACHED, [entity]), [entity], check=True):
                break
            await asyncio.sleep(0.002)
            if not send(conn, hits, hit_request, [top], check=n == 0):
                break
            await asyncio.sleep(0.002)
    finally:
        conn.close()
    after = await counters(client, cache, hot)
    pg_d = delta(await pg_counts(pg, schema, args.pg_settle), pg_before)
    gw_d, cache_d, hot_d = (delta(a, b) for a, b in zip(after, before, strict=True))
    requests = misses.requests + hits.requests
    return {
        "misses": misses,
        "hits": hits,
        "all_missed": all(m == 1 for m in misses.misses),
        "all_hit": all(m == 0 for m in hits.misses),
        "requests": requests,
        "cache_mget_per_request": cache_d["mget"] / requests if requests else 0.0,
        "pg_scans": pg_d.get("idx_scan", 0) + pg_d.get("seq_scan", 0) if pg_d else None,
        "hot_mget": hot_d["mget"],
        "gateway_misses": gw_d.get("lookups_total:miss", 0),
    }


# -- the report ----------------------------------------------------------------------------------------------


def report(out: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any], list[str]]:
    """The markdown table, the summary figures, and what failed."""
    runs: list[Run] = out.get("runs", [])
    problems = [f for run in runs for f in run.failures]
    lines = [
        f"{args.entities:,} entities x 50 features, Zipf s={args.zipf}, cache {args.cache_fraction:.0%}; "
        f"{args.rounds} rounds x {args.seconds:g} s per run, 1 connection, 1 worker; "
        f"load average {os.getloadavg()[0]:.2f}",
        "",
        "| group | entities/request | requests | req/s | p50 ms | p99 ms | gateway CPU ms/req | p50 ratio "
        "| p50 ratio, median of rounds |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    summary: dict[str, Any] = {"sizes": {}}
    for size in args.sizes:
        per: dict[str, dict[str, float]] = {}
        for group in (CACHED, HOT):
            mine = [r.summary() for r in runs if r.group == group and r.entities == size and r.requests]
            if not mine:
                continue
            per[group] = {k: statistics.median(s[k] for s in mine) for k in mine[0]}
            per[group]["requests"] = sum(s["requests"] for s in mine)
        if len(per) < 2:
            continue
        ratio = per[CACHED]["p50_ms"] / per[HOT]["p50_ms"]
        # Each round's two runs follow each other: their ratio is less moved by a neighbour's load than the
        # ratio of medians taken over the whole session.
        paired = [
            c.summary()["p50_ms"] / h.summary()["p50_ms"]
            for c in runs
            for h in runs
            if c.group == CACHED and h.group == HOT and c.entities == h.entities == size and c.round == h.round
            if c.requests and h.requests
        ]
        round_ratio = statistics.median(paired) if paired else float("nan")
        summary["sizes"][size] = {**per, "p50_ratio": ratio, "p50_ratio_rounds": paired, "p50_round_ratio": round_ratio}
        for group in (CACHED, HOT):
            s = per[group]
            lines.append(
                f"| {group} ({'PostgreSQL + cache' if group == CACHED else 'all Redis'}) | {size} | "
                f"{s['requests']:,.0f} | {s['rps']:,.0f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
                f"{s['cpu_ms_per_request']:.3f} | {f'{ratio:.2f}x' if group == CACHED else ''} | "
                f"{f'{round_ratio:.2f}x' if group == CACHED else ''} |"
            )
    counts = out.get("counts", {}).get(CACHED, {})
    hits, misses = counts.get("gw.lookups_total:hit", 0), counts.get("gw.lookups_total:miss", 0)
    hit_rate = hits / (hits + misses) if hits + misses else 0.0
    # The promotion script's GET of each key it writes is a keyspace lookup too: take it out of the misses.
    promoted = counts.get("gw.promotions_total:written", 0) + counts.get("gw.promotions_total:stale", 0)
    server_hits = counts.get("cache.keyspace_hits", 0)
    server_misses = counts.get("cache.keyspace_misses", 0) - promoted
    server_rate = server_hits / (server_hits + server_misses) if server_hits + server_misses > 0 else 0.0
    requests = counts.get("requests", 0)
    memory = out.get("memory", {})
    mem_ratio = memory["cache_used_memory"] / memory["hot_used_memory"] if memory else float("nan")
    data_ratio = memory["cache_data_bytes"] / memory["hot_data_bytes"] if memory else float("nan")
    miss = out.get("miss", {})
    cold_misses: Run | None = miss.get("misses")
    cold_hits: Run | None = miss.get("hits")
    if cold_misses is not None and cold_hits is not None:
        problems += cold_misses.failures + cold_hits.failures
        if not miss["all_missed"]:
            problems.append("a request for a never-read id was a cache hit")
    one = [r for r in runs if r.group == CACHED and r.entities == 1]
    hit_lat = sorted(t for r in one for t, m in zip(r.latencies_ms, r.misses, strict=True) if m == 0)
    miss_lat = sorted(t for r in one for t, m in zip(r.latencies_ms, r.misses, strict=True) if m > 0)
    cold_p50 = percentile(sorted(cold_misses.latencies_ms), 50) if cold_misses is not None else 0.0
    warm_p50 = percentile(sorted(cold_hits.latencies_ms), 50) if cold_hits is not None else 0.0
    summary |= {
        "hit_rate": hit_rate,
        "cache_server_hit_rate": server_rate,
        "promotions": {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("gw.promotions_total")},
        "requests": requests,
        "cache_mget_per_request": counts.get("cache.mget", 0) / requests if requests else 0.0,
        "requests_with_miss": counts.get("requests_with_miss", 0),
        "pg_scans": counts.get("pg.idx_scan", 0) + counts.get("pg.seq_scan", 0),
        "keys_missed": counts.get("keys_missed", 0),
        "hot_mget_per_request": (
            out["counts"][HOT].get("hot.mget", 0) / out["counts"][HOT]["requests"]
            if out.get("counts", {}).get(HOT, {}).get("requests")
            else 0.0
        ),
        "memory_ratio": mem_ratio,
        "data_ratio": data_ratio,
        "hit_p50_ms": percentile(hit_lat, 50),
        "zipf_miss_p50_ms": percentile(miss_lat, 50),
        "spaced_miss_p50_ms": cold_p50,
        "spaced_hit_p50_ms": warm_p50,
        "pg_floor_p50_ms": out.get("pg_floor_p50_ms", 0.0),
    }
    if memory:
        lines += [
            "",
            "| measure | value | target |",
            "|---|--:|--:|",
            f"| hit rate, measured runs (gateway `/metrics`) | {hit_rate:.2%} ({hits:,.0f} of "
            f"{hits + misses:,.0f}) | >= 85% |",
            f"| hit rate, cache server `keyspace_hits` (less promotion lookups) | {server_rate:.2%} | |",
            f"| p50 ratio, 1 entity (cached / all Redis): of the medians; median of the rounds' | "
            f"{summary['sizes'].get(1, {}).get('p50_ratio', float('nan')):.2f}x; "
            f"{summary['sizes'].get(1, {}).get('p50_round_ratio', float('nan')):.2f}x | <= 1.3x |",
            f"| Redis used_memory: cache / all Redis | {memory['cache_used_memory'] / 2**20:,.1f} / "
            f"{memory['hot_used_memory'] / 2**20:,.1f} MiB = {mem_ratio:.1%} | <= 15% |",
            f"| data bytes: cache / all Redis (less each server's empty baseline) | {data_ratio:.1%} | |",
            f"| keys: cache / all Redis | {memory['cache_keys']:,} / {memory['hot_keys']:,} | |",
            "| promotions written / stale / dropped / failed | "
            + " / ".join(f"{summary['promotions'].get(k, 0):,.0f}" for k in ("written", "stale", "dropped", "failed"))
            + " | dropped 0 |",
            f"| cache MGET calls per request (cached group) | {summary['cache_mget_per_request']:.3f} | 1 |",
        ]
        pg_scans = summary["pg_scans"] if "pg.idx_scan" in counts else None
        lines.append(
            "| PostgreSQL index scans (one per key read) / keys missed, over requests with a miss | "
            + (f"{pg_scans:,.0f}" if pg_scans is not None else "not counted")
            + f" / {summary['keys_missed']:,.0f}, {summary['requests_with_miss']:,.0f} requests | equal |"
        )
        if cold_misses is not None and cold_hits is not None and cold_misses.requests:
            scans = miss["pg_scans"]
            lines += [
                f"| spaced never-read + hit pairs ({cold_misses.requests:,} + {cold_hits.requests:,} requests): "
                f"cache MGETs per request; PostgreSQL scans per never-read request | "
                f"{miss['cache_mget_per_request']:.3f}; "
                + (f"{scans / cold_misses.requests:.3f}" if scans is not None else "not counted")
                + " | 1; 1 |",
                f"| p50, 1 entity, closed loop (Zipf runs): hit / miss | {summary['hit_p50_ms']:.3f} / "
                f"{summary['zipf_miss_p50_ms']:.3f} ms | |",
                f"| p50, 1 entity, 2 ms apart: hit / never-read miss (difference) | {warm_p50:.3f} / {cold_p50:.3f} ms "
                f"({cold_p50 - warm_p50:+.3f}) | |",
                f"| PostgreSQL's read of one key, p50 (asyncpg, the gateway's statement) | "
                f"{summary['pg_floor_p50_ms']:.3f} ms | |",
            ]
    return "\n".join(lines), summary, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--cache-fraction", type=float, default=0.10)
    parser.add_argument("--zipf", type=float, default=1.1, help="the exponent s")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measured run (one group, one size)")
    parser.add_argument("--requests", type=int, default=20_000, help="at most, per measured run (built up front)")
    parser.add_argument("--sizes", default="1,10", help="entities per measured request")
    parser.add_argument("--miss-requests", type=int, default=1000, help="requests for never-read ids")
    parser.add_argument("--warmup-seconds", type=float, default=600.0, help="at most")
    parser.add_argument("--pg-settle", type=float, default=11.0, help="s for PostgreSQL's counters (0: none)")
    parser.add_argument("--batch", type=int, default=5000, help="rows per write while loading")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--smoke", action="store_true", help="20,000 entities, a few seconds (CI: never judged)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.smoke:
        args.entities, args.rounds, args.seconds, args.requests = 20_000, 2, 0.5, 2000
        args.miss_requests, args.warmup_seconds, args.pg_settle = 100, 3.0, 0.0
    args.sizes = [int(s) for s in args.sizes.split(",")]
    servers = Servers(RedisServer(), RedisServer(), f"fg_cache_{os.getpid()}")
    out: dict[str, Any] = {}
    failure: str | None = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            servers.hot.spawn()
            servers.cache.spawn()
            asyncio.run(servers.hot.wait_ready())
            asyncio.run(servers.cache.wait_ready())
            asyncio.run(drop_schema(servers.schema))
            out = asyncio.run(bench(args, servers, Path(tmp)))
        except (BenchError, OSError, asyncpg.PostgresError) as exc:
            failure = str(exc)
            gateway_log = Path(tmp, "gateway.log")
            if gateway_log.exists():
                log(f"the gateway's log ends:\n{gateway_log.read_text(errors='replace')[-3000:]}")
        finally:
            servers.hot.stop()
            servers.cache.stop()
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                asyncio.run(drop_schema(servers.schema))
    table, summary, problems = report(out, args) if out else ("", {}, [])
    if failure:
        problems.append(failure)
    print(table, flush=True)
    if args.json:
        runs = [asdict(r) | r.summary() for r in out.get("runs", [])]
        for r in runs:
            del r["latencies_ms"], r["misses"]
        miss = {k: (asdict(v) | v.summary() if isinstance(v, Run) else v) for k, v in out.get("miss", {}).items()}
        doc = {k: v for k, v in out.items() if k not in ("runs", "miss")} | {"runs": runs, "miss": miss}
        doc |= {"summary": summary, "table": table, "problems": problems, "cores": os.cpu_count()}
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    for problem in problems:
        log(f"FAILED: {problem}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
