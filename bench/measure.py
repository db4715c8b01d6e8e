"""The measurements: wrk against the gateway, the raw floor (redis-py + asyncpg, no gateway), storage sizes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from app.registry.model import Registry
from backends.cockroach import CockroachBackend
from backends.redis import RedisBackend
from bench.data import FIRST_ID, JOIN_KEY
from bench.procs import BenchError, log

LUA = Path(__file__).with_name("fetch.lua")
WRK_TIMEOUT_S = 10  # past wrk's timeout a request is an error, never a latency: keep it far above any tail


@dataclass
class Workload:
    """One wrk run: `entities` ids per request, the given feature refs, `connections` in parallel."""

    name: str
    entities: int
    features: Sequence[str]
    connections: int
    workers: int
    duration_s: int
    service: str | None = None  # fetch by this service instead of the feature list (which it serves)
    context: Mapping[str, str] = field(default_factory=dict)  # context field -> "int" or "float", random values
    accept: str | None = None  # the Accept header of each request (None: none sent, the server answers JSON)
    # Ids drawn by the bench (one a line, `entities` per request, in order) instead of wrk's uniform draws: the
    # measured run's and the warm-up's (other draws, so the warm-up does not preload exactly what is measured)
    ids_file: Path | None = None
    warmup_ids_file: Path | None = None

    def selector(self) -> str:
        """The body's member naming what to fetch (bench/fetch.lua)."""
        if self.service is not None:
            return f'"service":{json.dumps(self.service)}'
        return '"features":' + json.dumps(list(self.features), separators=(",", ":"))


@dataclass
class WrkResult:
    workload: str
    entities: int
    features: int
    connections: int
    workers: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p99_9_ms: float
    max_ms: float
    mean_ms: float
    non200: int
    non200_by_status: dict[str, int]
    socket_errors: dict[str, int]
    first_failure: str | None
    load_average: tuple[float, float]  # 1-minute load average before and after: the box is shared
    # CPU the gateway's processes used per request: far steadier than latency on a busy box, and what the
    # hot path costs (10 ms clock ticks, so meaningful over a few seconds, not one request)
    gateway_cpu_ms_per_request: float | None
    warmup_requests: int = 0  # of the unmeasured warm-up run before it
    spans_per_request: float | None = None  # tracing rows: spans the OTLP sink received per request (warm-up too)
    accept: str | None = None  # the Accept header sent, if any
    content_types: dict[str, int] = field(default_factory=dict)  # answers by Content-Type (counted when `accept`)

    def answered(self) -> str | None:
        """The Content-Type most answers had (counted only for rows that send an Accept header)."""
        if not self.content_types:
            return None
        return max(self.content_types.items(), key=lambda item: item[1])[0]

    @property
    def failures(self) -> int:
        errors = self.socket_errors
        return self.non200 + errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]

    def problems(self) -> list[str]:
        found = []
        if self.requests == 0:
            found.append(f"{self.workload}: no request completed")
        if self.failures:
            found.append(
                f"{self.workload}: {self.failures} of {self.requests} requests failed "
                f"(non-200 by status {self.non200_by_status}, socket errors {self.socket_errors}); "
                f"first: {self.first_failure}"
            )
        return found


@dataclass(frozen=True)
class WrkOptions:
    wrk: str  # the binary
    id_max: int  # ids are drawn from FIRST_ID..id_max
    seed: int
    deadline_ms: int
    threads: int
    pool: int  # requests each wrk thread builds up front and cycles through
    log_path: Path  # wrk's own output is appended here


async def run_wrk(
    options: WrkOptions,
    url: str,
    workload: Workload,
    *,
    duration_s: int | None = None,
    seed: int | None = None,
    cpu_seconds: Callable[[], float] | None = None,
    warmup: bool = False,
) -> WrkResult:
    """One wrk run of `workload` against the gateway at `url`; `cpu_seconds` reads the gateway's CPU time.
    `warmup`: the workload's warm-up ids file, if it has one, instead of its measured one."""
    duration = workload.duration_s if duration_s is None else duration_s
    ids_file = workload.warmup_ids_file if warmup else workload.ids_file
    threads = max(1, min(options.threads, workload.connections))
    command = [
        options.wrk,
        f"-t{threads}",
        f"-c{workload.connections}",
        f"-d{duration}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(LUA),
        f"{url}/v1/features/fetch",
        "--",
        str(workload.entities),
        str(FIRST_ID),
        str(options.id_max),
        str(options.seed if seed is None else seed),
        str(options.pool),
        JOIN_KEY,
        workload.selector(),
        str(options.deadline_ms),
        ",".join(f"{name}:{kind}" for name, kind in workload.context.items()),
        workload.accept or "",
        str(ids_file) if ids_file is not None else "",
    ]
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds() if cpu_seconds else 0.0
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out_bytes, _ = await proc.communicate()
    cpu_used = cpu_seconds() - cpu_before if cpu_seconds else None
    out = out_bytes.decode(errors="replace")
    with options.log_path.open("a") as f:
        f.write(f"$ {' '.join(command[:9])} -- ...\n{out}\n")
    line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}) on {workload.name}:\n{out[-2000:]}")
    raw: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    lat = raw["latency_us"]
    seconds = raw["duration_us"] / 1e6
    return WrkResult(
        workload=workload.name,
        entities=workload.entities,
        features=len(workload.features),
        connections=workload.connections,
        workers=workload.workers,
        duration_s=round(seconds, 3),
        requests=raw["requests"],
        rps=raw["requests"] / seconds if seconds else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        p99_9_ms=lat["p99_9"] / 1000,
        max_ms=lat["max"] / 1000,
        mean_ms=(lat["mean"] or 0) / 1000,
        non200=raw["non200"],
        non200_by_status=raw["non200_by_status"],
        socket_errors={k: raw["errors"][k] for k in ("connect", "read", "write", "status", "timeout")},
        first_failure=raw["first_failure"],
        load_average=(load_before, os.getloadavg()[0]),
        gateway_cpu_ms_per_request=cpu_used * 1000 / raw["requests"]
        if cpu_used is not None and raw["requests"]
        else None,
        accept=workload.accept,
        content_types=dict(raw.get("content_types") or {}),
    )


# -- the floor -----------------------------------------------------------------------------------------


@dataclass
class FloorResult:
    entities: int
    duration_s: float
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    load_average: tuple[float, float]
    reads: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [] if self.iterations else [f"floor {self.entities} x: no read completed"]


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * pct // 100)))
    return sorted_values[int(rank) - 1]


@dataclass(frozen=True, slots=True)
class _Read:
    call: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    expected: int  # values or rows the read must find: the data is all there
    redis: bool


class Floor:
    """The gateway's reads issued directly: one redis-py MGET per Redis group and asyncpg's SELECT per
    PostgreSQL backend, all at once with asyncio.gather, on one connection each, in this process.

    Keys and SQL come from the backends themselves (`RedisBackend.key`, `CockroachBackend._read_statement`),
    so the floor reads exactly what the gateway reads and follows any change to them; nothing is decoded,
    which is the gateway's work.
    """

    def __init__(self, registry: Registry, groups: Sequence[str]):
        self.registry = registry
        self.redis: dict[str, tuple[RedisBackend, list[str]]] = {}
        self.sql: dict[str, tuple[CockroachBackend, list[str]]] = {}
        for name in groups:
            group = registry.groups[name]
            spec = registry.backends[group.backend]
            if spec.type == "redis":
                if group.backend not in self.redis:
                    self.redis[group.backend] = (RedisBackend(spec, registry.groups_on(spec.name)), [])
                self.redis[group.backend][1].append(name)
            elif spec.type == "cockroach":
                if group.backend not in self.sql:
                    self.sql[group.backend] = (CockroachBackend(spec, registry.groups_on(spec.name)), [])
                self.sql[group.backend][1].append(name)
            else:
                raise BenchError(f"the floor reads Redis and CockroachDB/PostgreSQL only, not {spec.type}")
        self._clients: list[aioredis.Redis] = []
        self._conns: list[Any] = []

    def describe(self) -> list[str]:
        reads = [f"redis MGET {', '.join(groups)}" for _, groups in self.redis.values()]
        reads += [f"asyncpg SELECT {', '.join(groups)}" for _, groups in self.sql.values()]
        return reads

    async def open(self) -> None:
        for name in self.redis:
            client = aioredis.Redis.from_url(self.registry.backends[name].options["url"])
            await client.ping()
            self._clients.append(client)
        for name in self.sql:
            self._conns.append(await asyncpg.connect(self.registry.backends[name].options["dsn"]))

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        for conn in self._conns:
            await conn.close()
        for backend, _ in self.redis.values():
            await backend.aclose()

    def _reads(self, keys: list[str]) -> list[_Read]:
        """What one fetch of `keys` sends: one MGET per Redis backend, one SELECT per SQL backend."""
        reads: list[_Read] = []
        for client, (redis_backend, groups) in zip(self._clients, self.redis.values(), strict=True):
            redis_keys = [redis_backend.key(self.registry.groups[g], k) for g in groups for k in keys]
            reads.append(_Read(client.mget, (redis_keys,), len(redis_keys), redis=True))
        for conn, (sql_backend, groups) in zip(self._conns, self.sql.values(), strict=True):
            # The statement and arguments of CockroachBackend.read: (group name, keys) per group.
            args: list[Any] = []
            for g in groups:
                args += [g, keys]
            statement = sql_backend._read_statement(len(groups))
            reads.append(_Read(conn.fetch, (statement, *args), len(groups) * len(keys), redis=False))
        return reads

    @staticmethod
    async def _once(reads: list[_Read]) -> int:
        """Issue one fetch's reads concurrently; the nanoseconds until the last answered."""
        started = time.perf_counter_ns()
        results = await asyncio.gather(*(r.call(*r.args) for r in reads))
        elapsed = time.perf_counter_ns() - started
        for read, result in zip(reads, results, strict=True):
            found = sum(b is not None for b in result) if read.redis else len(result)
            if found != read.expected:
                kind = "MGET" if read.redis else "SELECT"
                raise BenchError(f"the floor's {kind} found {found} of {read.expected} stored values")
        return elapsed

    async def run(self, entities: int, id_max: int, duration_s: float, warmup_s: float, seed: int) -> FloorResult:
        rng = random.Random(f"{seed}:floor:{entities}")
        batches = []
        for _ in range(2000):
            ids = [str(rng.randint(FIRST_ID, id_max)) for _ in range(entities)]
            batches.append(self._reads(list(dict.fromkeys(ids))))  # the gateway reads each key once
        load_before = os.getloadavg()[0]
        timings: list[float] = []
        for phase, seconds in (("warmup", warmup_s), ("measure", duration_s)):
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                elapsed_ns = await self._once(batches[i % len(batches)])
                i += 1
                if phase == "measure":
                    timings.append(elapsed_ns / 1e6)
        timings.sort()
        return FloorResult(
            entities=entities,
            duration_s=duration_s,
            iterations=len(timings),
            p50_ms=percentile(timings, 50),
            p90_ms=percentile(timings, 90),
            p99_ms=percentile(timings, 99),
            max_ms=timings[-1] if timings else 0.0,
            load_average=(load_before, os.getloadavg()[0]),
            reads=self.describe(),
        )


# -- storage -------------------------------------------------------------------------------------------


async def redis_data_memory(client: aioredis.Redis, settle_s: float = 5.0) -> int:
    """`INFO memory` used_memory less the client connections' buffers (`MEMORY STATS` clients.normal), once
    it stops moving (incremental rehashing). Client buffers are not data: a big write leaves a query buffer
    that Redis only shrinks after the connection idles for 2 s, which would otherwise land in a delta.
    """
    previous = -1
    deadline = time.monotonic() + settle_s
    while True:
        info = await client.info("memory")
        stats = await client.memory_stats()
        used = int(info["used_memory"]) - int(stats["clients.normal"])
        if used == previous or time.monotonic() > deadline:
            return used
        previous = used
        await asyncio.sleep(0.25)


@dataclass
class PgSize:
    table: str
    total_bytes: int  # pg_total_relation_size: heap + TOAST + indexes (+ free space and visibility maps)
    heap_bytes: int
    index_bytes: int
    rows: int


async def pg_size(dsn: str, schema: str, table: str) -> PgSize:
    """The table's size after VACUUM ANALYZE (its steady state: maps built, statistics fresh)."""
    conn = await asyncpg.connect(dsn)
    try:
        qualified = f'"{schema}"."{table}"'
        await conn.execute(f"VACUUM ANALYZE {qualified}")
        row = await conn.fetchrow(
            "SELECT pg_total_relation_size($1::regclass), pg_relation_size($1::regclass), "
            "pg_indexes_size($1::regclass)",
            qualified,
        )
        rows = await conn.fetchval(f"SELECT count(*) FROM {qualified}")
        return PgSize(qualified, int(row[0]), int(row[1]), int(row[2]), int(rows))
    finally:
        await conn.close()


def as_dict(value: Any) -> Any:
    return asdict(value)


def log_result(result: WrkResult | FloorResult, label: str) -> None:
    if isinstance(result, WrkResult):
        log(
            f"{label}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms "
            f"({result.requests} requests, {result.failures} failed"
            + (
                f", gateway CPU {result.gateway_cpu_ms_per_request:.3f} ms/request)"
                if result.gateway_cpu_ms_per_request
                else ")"
            )
        )
    else:
        log(f"{label}: p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms ({result.iterations} reads)")
