"""`python -m bench`: start what the benchmark needs, load the data, run every workload, print one table.

Order of a run (each step fails the run, exit 1, rather than print a number that cannot be trusted):
  1. wrk present (apt-get installs it when missing), a redis-server of our own on a free port, a fresh
     PostgreSQL schema of our own, the gateway (`feature-gateway serve --workers 1`) as a subprocess;
  2. the data through POST /v1/features/write, Redis `used_memory` measured around each Redis group,
     then a sample read back (every value PRESENT and equal to what was written) and PostgreSQL's table
     size after VACUUM ANALYZE;
  3. per request size (1, 10, 100 entities x 100 features, 1 connection): wrk, then right after it the
     floor (the same reads straight from redis-py and asyncpg), so each pair sees the same box
     (`--repeat N`: N such pairs, the table shows medians);
     The largest size runs a third time, asking `Accept: application/msgpack` (`--no-msgpack`: not);
  4. 32 connections, 1 x 100, for each `--workers` count (the gateway restarted with that many);
  5. `--zipf`: up to `--zipf-entities` entities, then 1 x 100 at 32 connections, 1 worker, ids drawn from
     Zipf(1.1), on a gateway without and one with the per-worker local cache (`local_cache_ms`), alternating;
  6. the table on stdout, `--json FILE` with everything, `--baseline FILE` the ratios to a stored run;
     then everything stopped and the schema dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
import uvloop

from app.errors import RegistryError
from app.registry.load import load_registry
from app.registry.model import Registry
from bench.data import (
    FIRST_ID,
    MSGPACK,
    check_values,
    entity_ids,
    generate,
    iter_values,
    verify,
    verify_msgpack,
    write_ids,
    write_rows,
    zipf_ids,
    zipf_top_share,
)
from bench.measure import (
    Floor,
    Workload,
    WrkOptions,
    WrkResult,
    log_result,
    pg_size,
    redis_data_memory,
    run_wrk,
)
from bench.procs import BenchError, GatewayProcess, OtlpSink, RedisServer, ensure_wrk, log
from bench.report import (
    LOCAL_CACHE,
    MSGPACK_ROW,
    NO_LOCAL_CACHE,
    Report,
    Storage,
    caption,
    compare,
    compare_summaries,
    load_record,
    table,
    targets,
)

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = Path(__file__).with_name("registry.yaml")
DEFAULT_PG_DSN = "postgresql://root@127.0.0.1:5432/test"
SCHEMA_PREFIX = "fg_bench_"
REDIS_GROUPS = ("live", "embed")  # measured one after the other by used_memory delta
SQL_GROUP = "history"
FETCHED = ("live", "history")  # each request: every feature of these groups (50 on Redis + 50 on PostgreSQL)
WARMUP_ID_OFFSET = 1_000_000  # the warm-up write goes to an id outside the measured range


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the gateway (issue 3): latency, throughput, overhead over the raw reads, storage.",
    )
    parser.add_argument("--entities", type=int, help="entities loaded per group [10000; --smoke: 200]")
    parser.add_argument("--duration", type=int, help="seconds measured per workload [10; --smoke: 1]")
    parser.add_argument("--warmup", type=int, help="seconds of unmeasured load before each workload [2; --smoke: 1]")
    parser.add_argument("--sizes", default="1,10,100", help="entities per request at 1 connection [1,10,100]")
    parser.add_argument("--connections", type=int, default=32, help="connections of the throughput rows [32]")
    parser.add_argument("--workers", help="gateway worker counts for the throughput rows [1,2; --smoke: 1]")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI): 200 entities, 1 s, 1 worker")
    parser.add_argument("--repeat", type=int, default=1, help="run each workload this many times; medians [1]")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every result as JSON here")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two --json files; runs nothing"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="after the run, print each shared measure beside this stored --json run's with the ratio, and issue "
        "15's targets (e.g. bench/baselines/c26f67a.json)",
    )
    parser.add_argument(
        "--msgpack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the largest --sizes row again with `Accept: application/msgpack` [on]",
    )
    parser.add_argument(
        "--zipf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Zipf rows: 1 x 100 at --connections, 1 worker, without and with the per-worker local cache "
        "[on; --smoke: on, tiny]",
    )
    parser.add_argument(
        "--zipf-entities", type=int, help="entities the Zipf ids are drawn over (loaded first) [100000; --smoke: 2000]"
    )
    parser.add_argument("--zipf-s", type=float, default=1.1, help="the Zipf exponent s [1.1]")
    parser.add_argument(
        "--zipf-requests", type=int, default=20_000, help="Zipf draws the driver cycles through per run [20000]"
    )
    parser.add_argument(
        "--local-cache-ms", type=int, default=1000, help="local_cache_ms of live and history in the cached row [1000]"
    )
    parser.add_argument("--pg-dsn", default=os.environ.get("BENCH_PG_DSN", DEFAULT_PG_DSN), help="PostgreSQL DSN")
    parser.add_argument("--pg-schema", help=f"schema to (re)create and drop [{SCHEMA_PREFIX}<pid>]")
    parser.add_argument("--seed", type=int, default=1, help="data and request ids are drawn from this seed [1]")
    parser.add_argument("--deadline-ms", type=int, default=1000, help="deadline_ms of each fetch [1000]")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (one keeps a core for the server)")
    parser.add_argument("--batch", type=int, default=1000, help="rows per write request while loading [1000]")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the gateway, e.g. GATEWAY_MAX_ENTITIES=2000 (GATEWAY_* and OTEL_* are not inherited)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority of the bench and all it starts (-20..19; below 0 needs root): on a shared box, "
        "-10 keeps neighbours from stretching the latencies [0: unchanged]",
    )
    parser.add_argument("--log-dir", type=Path, help="keep the gateway and wrk logs here [a temporary folder]")
    parser.add_argument("--keep", action="store_true", help="leave the PostgreSQL schema in place at the end")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also run the first --sizes row with tracing off, at 100%% and at 1%% sampling (OTLP export to a "
        "local sink), interleaved, each --repeat times",
    )
    parser.add_argument(
        "--services",
        action="store_true",
        help="also run 1 and 100 entities fetched by feature list, by service, and by a service with two on-demand "
        "features, interleaved, each --repeat times",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.entities = args.entities or (200 if smoke else 10_000)
    args.duration = args.duration or (1 if smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.workers = [int(w) for w in (args.workers or ("1" if smoke else "1,2")).split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.zipf = True if args.zipf is None else args.zipf
    args.zipf_entities = args.zipf_entities or (2_000 if smoke else 100_000)
    if args.baseline is not None and not args.compare:
        try:
            load_record(args.baseline)  # now, not after a run of minutes
        except ValueError as exc:
            parser.error(f"--baseline: {exc}")
    if min(args.zipf_entities, args.zipf_requests, args.local_cache_ms) < 1 or args.zipf_s <= 0:
        parser.error("--zipf-entities, --zipf-requests, --local-cache-ms and --zipf-s are positive")
    args.pg_schema = args.pg_schema or f"{SCHEMA_PREFIX}{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", args.pg_schema):
        parser.error("--pg-schema is an SQL identifier (letters, digits, underscore)")
    if min(args.entities, args.duration, args.repeat, *args.workers, *args.sizes) < 1 or args.warmup < 0:
        parser.error("--entities, --duration, --repeat, --sizes and --workers are positive; --warmup is not negative")
    for item in args.gateway_env:
        if "=" not in item:
            parser.error(f"--gateway-env takes KEY=VALUE, not {item!r}")
    return args


# -- setup and teardown --------------------------------------------------------------------------------


async def reset_schema(dsn: str, schema: str) -> None:
    """Drop our schema (the gateway recreates it) and those of earlier bench runs whose process is gone."""
    conn = await asyncpg.connect(dsn)
    try:
        names = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", SCHEMA_PREFIX.replace("_", r"\_") + "%"
        )
        stale = [r[0] for r in names if _pid_gone(r[0].removeprefix(SCHEMA_PREFIX))]
        for name in {schema, *stale}:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def _pid_gone(text: str) -> bool:
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def gateway_env(args: argparse.Namespace, redis_url: str) -> dict[str, str]:
    """The caller's environment without GATEWAY_* and OTEL_* (runs stay comparable), plus the bench's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    env |= {"BENCH_REDIS_URL": redis_url, "BENCH_PG_DSN": args.pg_dsn, "BENCH_PG_SCHEMA": args.pg_schema}
    # These rows measure what the gateway serves at a given concurrency, comparable across commits: admission
    # control would answer the 32-connection rows' excess 503 (bench/overload measures it; --gateway-env
    # GATEWAY_ADMISSION=true puts it back).
    env["GATEWAY_ADMISSION"] = "false"
    env |= dict(item.split("=", 1) for item in args.gateway_env)
    return env


def _command_output(command: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False, cwd=ROOT)
        return (done.stdout or done.stderr).strip()
    return ""


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_command_output(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit + ("-dirty" if dirty else ""),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
    }


# -- the run -------------------------------------------------------------------------------------------


async def load_data(
    args: argparse.Namespace, registry: Registry, gateway: GatewayProcess, redis_url: str, report: Report
) -> None:
    ids = list(entity_ids(args.entities))
    order = (*REDIS_GROUPS, SQL_GROUP)
    data = {name: generate(registry.groups[name], args.entities, args.seed) for name in order}
    redis_client = aioredis.Redis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            # One row per Redis group first, outside the measured ids: the write script gets cached and the
            # gateway's connection opened before the baseline, so the deltas hold only the data.
            for name in REDIS_GROUPS:
                await write_rows(client, registry.groups[name], [WARMUP_ID_OFFSET], data[name][:1], args.batch)
            used = await redis_data_memory(redis_client)
            for name in order:
                started = time.perf_counter()
                await write_rows(client, registry.groups[name], ids, data[name], args.batch)
                log(f"loaded {name}: {len(ids):,} rows in {time.perf_counter() - started:.1f} s")
                values = len(ids) * len(registry.groups[name].features)
                if name in REDIS_GROUPS:
                    now = await redis_data_memory(redis_client)
                    measured = "Redis used_memory delta less client buffers"
                    report.storage.append(Storage(name, measured, now - used, values, (now - used) / values))
                    used = now
            await verify(client, registry, {n: data[n] for n in order}, args.entities, 50, args.seed)
            log("read back a sample: every value PRESENT and as written")
            if args.msgpack:
                sample = random.Random(f"{args.seed}:msgpack").sample(list(ids), min(max(args.sizes), len(ids)))
                features = [f.ref for name in FETCHED for f in registry.groups[name].features]
                answered = await verify_msgpack(client, sample, features)
                report.meta["msgpack_content_type"] = answered
                if answered.startswith(MSGPACK):
                    log(f"Accept: {MSGPACK}: the answer decodes to the JSON answer's values ({answered})")
                else:
                    note = (
                        f"the gateway answers {answered or 'no Content-Type'} to Accept: {MSGPACK}: "
                        "the msgpack row measures that"
                    )
                    report.notes.append(note)
                    log(note)
    finally:
        await redis_client.aclose()

    # Now rather than at the end: the VACUUM ANALYZE that autovacuum would otherwise run on the fresh table
    # in the middle of a measured workload.
    options = registry.backends[registry.groups[SQL_GROUP].backend].options
    report.pg = size = await pg_size(args.pg_dsn, options["schema"], options["table"])
    if size.rows != args.entities:
        raise BenchError(f"the PostgreSQL table holds {size.rows} rows, not {args.entities}")
    values = args.entities * len(registry.groups[SQL_GROUP].features)
    measured = "PostgreSQL pg_total_relation_size after VACUUM ANALYZE"
    report.storage.append(Storage(SQL_GROUP, measured, size.total_bytes, values, size.total_bytes / values))


async def run(args: argparse.Namespace, report: Report, log_dir: Path) -> None:
    wrk = ensure_wrk()
    report.meta["wrk"] = (_command_output([wrk, "-v"]).splitlines() or [""])[0]
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus:
        log(f"the machine is busy (load average {load:.1f} on {cpus} cores): expect noisy latencies")
    await reset_schema(args.pg_dsn, args.pg_schema)
    redis_server = RedisServer()
    gateway: GatewayProcess | None = None
    floor: Floor | None = None
    try:
        redis_server.spawn()
        await redis_server.wait_ready()
        env = gateway_env(args, redis_server.url)
        try:
            registry = load_registry(REGISTRY, env=env)
        except RegistryError as exc:
            raise BenchError(f"bench registry: {exc.detail}") from None
        report.meta["versions"] = await _server_versions(redis_server.url, args.pg_dsn)
        features = [f.ref for name in FETCHED for f in registry.groups[name].features]
        id_max = args.entities  # ids are 1..entities
        wrk_options = WrkOptions(wrk, id_max, args.seed, args.deadline_ms, args.wrk_threads, 2000, log_dir / "wrk.log")

        gateway = GatewayProcess(REGISTRY, 1, env, log_dir / "gateway-1.log")
        gateway.spawn()
        await gateway.wait_ready()
        log(f"gateway up on {gateway.url} (1 worker); loading {args.entities:,} entities per group")
        await load_data(args, registry, gateway, redis_server.url, report)

        floor = Floor(registry, FETCHED)
        await floor.open()
        for size in args.sizes:
            name = f"{size} x {len(features)}, 1 conn, 1 worker"
            workload = Workload(name, size, features, 1, 1, args.duration)
            # The largest size again as MessagePack, right after its JSON run and floor: the ratio compares neighbours
            packed = (
                Workload(name + MSGPACK_ROW, size, features, 1, 1, args.duration, accept=MSGPACK)
                if args.msgpack and size == max(args.sizes)
                else None
            )
            for _ in range(args.repeat):  # gateway then floor, back to back: each pair sees the same box
                report.record(await _wrk_with_warmup(wrk_options, gateway, workload, args.warmup))
                floor_result = await floor.run(size, id_max, args.duration, args.warmup, args.seed)
                report.record(floor_result)
                log_result(floor_result, f"floor {size} x {len(features)}")
                if packed is not None:
                    report.record(await _wrk_with_warmup(wrk_options, gateway, packed, extra_warmup(args)))

        if args.services:
            await _service_rows(args, gateway, wrk_options, features, report)

        if args.tracing:
            gateway.stop()
            await _tracing_rows(args, env, wrk_options, features, log_dir, report)
            gateway = GatewayProcess(REGISTRY, 1, env, log_dir / "gateway-1.log")
            gateway.spawn()
            await gateway.wait_ready()

        for workers in args.workers:
            if workers != gateway.workers:
                gateway.stop()
                gateway = GatewayProcess(REGISTRY, workers, env, log_dir / f"gateway-{workers}.log")
                gateway.spawn()
                await gateway.wait_ready()
                log(f"gateway restarted with {workers} workers")
            conns = f"{args.connections} conn{'s' if args.connections > 1 else ''}"
            name = f"1 x {len(features)}, {conns}, {workers} worker{'s' if workers > 1 else ''}"
            workload = Workload(name, 1, features, args.connections, workers, args.duration)
            for _ in range(args.repeat):
                report.record(await _wrk_with_warmup(wrk_options, gateway, workload, args.warmup))
        gateway.check_alive()

        if args.zipf:
            files, expected = await _load_zipf_entities(args, registry, gateway, log_dir, report)
            gateway.stop()
            gateway = None
            await _zipf_rows(args, env, wrk_options, features, log_dir, report, files, expected)
    finally:
        if floor is not None:
            await floor.aclose()
        if gateway is not None:
            gateway.stop()
        redis_server.stop()
        if not args.keep:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await drop_schema(args.pg_dsn, args.pg_schema)


def extra_warmup(args: argparse.Namespace) -> int:
    """The warm-up of the msgpack and Zipf rows: none in --smoke, which must stay quick and is never judged."""
    return 0 if args.smoke else args.warmup


ZIPF_GROUPS = FETCHED  # the Zipf rows read 1 entity x these groups' features; both hold --zipf-entities entities
ZIPF_SAMPLE = 20  # ids read back value by value: the most drawn ones (the local cache's), and as many at random


async def _load_zipf_entities(
    args: argparse.Namespace, registry: Registry, gateway: GatewayProcess, log_dir: Path, report: Report
) -> tuple[list[Path], dict[int, dict[str, list[Any]]]]:
    """Up to --zipf-entities entities in `live` and `history` (the first --entities are loaded already, with the
    same values: the generator's first n rows do not depend on how many follow), the Zipf draws written for
    fetch.lua (measured, warm-up), and the expected values of a sample of ids to read back later."""
    total = max(args.entities, args.zipf_entities)
    drawn = zipf_ids(args.zipf_entities, args.zipf_s, args.zipf_requests, args.seed)
    files = [
        write_ids(log_dir / "zipf-ids.txt", drawn),
        write_ids(
            log_dir / "zipf-ids-warmup.txt", zipf_ids(args.zipf_entities, args.zipf_s, args.zipf_requests, args.seed, 1)
        ),
    ]
    counts = Counter(drawn)
    hot = [i for i, _ in counts.most_common(ZIPF_SAMPLE)]
    rng = random.Random(f"{args.seed}:zipf-verify")
    sample = set(hot) | set(
        rng.sample(range(FIRST_ID, FIRST_ID + args.zipf_entities), min(ZIPF_SAMPLE, args.zipf_entities))
    )
    expected: dict[int, dict[str, list[Any]]] = {i: {} for i in sample}

    started = time.perf_counter()
    in_flight: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        for name in ZIPF_GROUPS:
            group = registry.groups[name]
            ids: list[int] = []
            values: list[list[Any]] = []
            for entity_id, row in zip(entity_ids(total), iter_values(group, total, args.seed), strict=True):
                if entity_id in expected:
                    expected[entity_id][name] = row
                if entity_id <= args.entities:
                    continue  # loaded with the rest of the data
                ids.append(entity_id)
                values.append(row)
                if len(ids) == args.batch:
                    # Two batches in flight: the next one is generated while the gateway writes this one
                    if len(in_flight) >= 2:
                        _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight.add(asyncio.create_task(write_rows(client, group, ids, values, args.batch)))
                    ids, values = [], []
            if ids:
                in_flight.add(asyncio.create_task(write_rows(client, group, ids, values, args.batch)))
        for task in asyncio.as_completed(in_flight):
            await task  # raises the first failed write
        seconds = time.perf_counter() - started
        added = max(total - args.entities, 0)
        log(f"loaded {added:,} more entities into {' and '.join(ZIPF_GROUPS)} for the Zipf rows in {seconds:.1f} s")
        options = registry.backends[registry.groups[SQL_GROUP].backend].options
        size = await pg_size(args.pg_dsn, options["schema"], options["table"])  # VACUUM ANALYZE the grown table
        if size.rows != total:
            raise BenchError(f"the PostgreSQL table holds {size.rows} rows, not {total}")
        await check_values(client, registry, expected, " (Zipf entities)")
    top_share = counts.most_common(1)[0][1] / len(drawn)
    report.meta["zipf"] = {
        "entities": args.zipf_entities,
        "s": args.zipf_s,
        "draws": len(drawn),
        "distinct_ids_drawn": len(counts),
        "top_id_share": top_share,
        "top_id_share_expected": zipf_top_share(args.zipf_entities, args.zipf_s),
        "entities_loaded": added,
        "load_seconds": round(seconds, 1),
    }
    log(
        f"Zipf s={args.zipf_s} over {args.zipf_entities:,}: {len(counts):,} distinct ids in {len(drawn):,} draws, "
        f"the most drawn {top_share:.1%} of them"
    )
    return files, expected


def local_cache_registry(text: str, groups: Sequence[str], ms: int) -> str:
    """bench/registry.yaml's text with `local_cache_ms: ms` added to each of these groups (nothing else changes:
    the comments, the ${BENCH_*} variables and the on-demand functions' folder stay as they are)."""
    for name in groups:
        pattern = re.compile(rf"^(  {re.escape(name)}:\n)", re.MULTILINE)
        text, found = pattern.subn(rf"\g<1>    local_cache_ms: {ms}\n", text, count=1)
        if not found:
            raise BenchError(f"bench/registry.yaml has no group {name!r} to give a local cache")
    return text


def _refusal(exc: Exception, log_path: Path) -> str:
    """The line saying why a gateway did not start (the registry's complaint, preferably)."""
    text = str(exc)
    with contextlib.suppress(OSError):
        text = log_path.read_text(errors="replace") + "\n" + text
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return next((x for x in reversed(lines) if "local_cache_ms" in x), lines[-1] if lines else "no message")


async def _zipf_rows(
    args: argparse.Namespace,
    env: dict[str, str],
    options: WrkOptions,
    features: list[str],
    log_dir: Path,
    report: Report,
    files: list[Path],
    expected: dict[int, dict[str, list[Any]]],
) -> None:
    """1 x 100 with Zipf ids at --connections, 1 worker: on bench/registry.yaml as it is, and on a copy whose
    `live` and `history` keep hot keys in each worker for --local-cache-ms; the gateway restarted for each,
    the two alternating (order rotated) when --repeat. A gateway that refuses `local_cache_ms` (one from before
    the field) skips the cached row with a note; the rest of the run stands."""
    conns = f"{args.connections} conn{'s' if args.connections > 1 else ''}"
    base = f"zipf 1 x {len(features)}, {conns}, 1 worker"
    # Next to bench/registry.yaml: the on-demand functions are imported from the registry's folder
    cached_path = REGISTRY.with_name(f".registry-local-cache-{os.getpid()}.yaml")
    cached_path.write_text(local_cache_registry(REGISTRY.read_text(), ZIPF_GROUPS, args.local_cache_ms))
    configurations = [
        (NO_LOCAL_CACHE, REGISTRY),
        (f"{LOCAL_CACHE}{args.local_cache_ms} ms", cached_path),
    ]
    refused: str | None = None
    try:
        try:
            load_registry(cached_path, env=env)
        except RegistryError as exc:
            refused = exc.detail
        for repeat in range(args.repeat):
            shift = repeat % len(configurations)
            for suffix, path in configurations[shift:] + configurations[:shift]:
                cached = path == cached_path
                if cached and refused is not None:
                    continue
                log_path = log_dir / f"gateway-zipf-{'cached' if cached else 'plain'}.log"
                gateway = GatewayProcess(path, 1, env, log_path)
                gateway.spawn()
                try:
                    try:
                        await gateway.wait_ready()
                    except BenchError as exc:
                        # Skipped only when it is the field it refuses: a cached gateway that crashes fails the run
                        why = _refusal(exc, log_path)
                        if not cached or "local_cache_ms" not in why or "unknown" not in why:
                            raise
                        refused = why
                        continue
                    workload = Workload(
                        base + suffix,
                        1,
                        features,
                        args.connections,
                        1,
                        args.duration,
                        ids_file=files[0],
                        warmup_ids_file=files[1],
                    )
                    report.record(await _wrk_with_warmup(options, gateway, workload, extra_warmup(args)))
                    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                        for _ in range(2):  # the second read of each id is the local cache's when it has one
                            await check_values(client, registry_of(path, env), expected, f" ({base + suffix})")
                finally:
                    gateway.stop()
    finally:
        cached_path.unlink(missing_ok=True)
    if refused is not None:
        note = (
            f"zipf row with local_cache_ms skipped: the gateway refuses the registry field ({refused}); "
            "the no-local-cache row ran alone"
        )
        report.notes.append(note)
        log(note)


def registry_of(path: Path, env: Mapping[str, str]) -> Registry:
    try:
        return load_registry(path, env=dict(env))
    except RegistryError as exc:
        raise BenchError(f"{path.name}: {exc.detail}") from None


TRACING = {"off": None, "100%": "1.0", "1%": "0.01"}  # row label -> GATEWAY_TRACE_SAMPLE_RATIO


async def _tracing_rows(
    args: argparse.Namespace,
    env: dict[str, str],
    options: WrkOptions,
    features: list[str],
    log_dir: Path,
    report: Report,
) -> None:
    """The first size at 1 connection, with tracing off, at 100% and at 1% sampling, the gateway restarted for
    each and exporting over OTLP/HTTP to a sink that answers at once (bench/otlp_sink.py), so what is measured
    is the gateway's own cost. Configurations alternate within each repeat, in an order rotated from one repeat
    to the next, so each ratio compares neighbours and none always runs in the same place.
    Every traced run must have delivered its spans (the sink counts them after the gateway's shutdown flush)."""
    size = args.sizes[0]
    sink = OtlpSink(log_dir / "otlp-sink.log")
    sink.spawn()
    try:
        await sink.wait_ready()
        configurations = list(TRACING.items())
        for repeat in range(args.repeat):
            # Each repeat starts one further along, so no configuration always runs first or last
            shift = repeat % len(configurations)
            for label, ratio in configurations[shift:] + configurations[:shift]:
                traced = dict(env)
                if ratio is not None:
                    traced |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "GATEWAY_TRACE_SAMPLE_RATIO": ratio}
                gateway = GatewayProcess(REGISTRY, 1, traced, log_dir / f"gateway-tracing-{ratio}.log")
                gateway.spawn()
                try:
                    await gateway.wait_ready()
                    before = await sink.stats()
                    name = f"{size} x {len(features)}, 1 conn, 1 worker, tracing {label}"
                    workload = Workload(name, size, features, 1, 1, args.duration)
                    result = await _wrk_with_warmup(options, gateway, workload, args.warmup)
                finally:
                    gateway.stop()  # its shutdown flushes the spans still queued
                spans = (await sink.stats())["spans"] - before["spans"]
                result.spans_per_request = spans / max(result.requests + result.warmup_requests, 1)
                # None at all, where the ratio makes some near certain (P(none) = e^-10 at 10 expected traces)
                if ratio is not None and not spans and float(ratio) * (result.requests + result.warmup_requests) >= 10:
                    raise BenchError(f"tracing {label}: no span reached the OTLP sink")
                if ratio is None and spans:
                    raise BenchError("tracing off: spans reached the OTLP sink")
                report.record(result)
                log(f"  {spans:,} spans exported ({result.spans_per_request:.2f} per request)")
    finally:
        sink.stop()


SERVICE_SIZES = (1, 100)
ON_DEMAND_CONTEXT = {"basket_value": "float", "hour": "int"}  # the request fields bench_model_on_demand reads


async def _service_rows(
    args: argparse.Namespace, gateway: GatewayProcess, options: WrkOptions, features: list[str], report: Report
) -> None:
    """The same 100 features by list, by service (bench_model), and by a service that adds two on-demand
    features (bench_model_on_demand, with context), one gateway, interleaved in rotated order."""
    for size in SERVICE_SIZES:
        base = f"{size} x {len(features)}, 1 conn, 1 worker"
        configurations = [
            Workload(f"{base}, by list", size, features, 1, 1, args.duration),
            Workload(f"{base}, by service", size, features, 1, 1, args.duration, service="bench_model"),
            Workload(
                f"{base}, by service + 2 on-demand",
                size,
                [*features, "basket_ratio", "hour_load"],
                1,
                1,
                args.duration,
                service="bench_model_on_demand",
                context=ON_DEMAND_CONTEXT,
            ),
        ]
        for repeat in range(args.repeat):
            shift = repeat % len(configurations)
            for workload in configurations[shift:] + configurations[:shift]:
                report.record(await _wrk_with_warmup(options, gateway, workload, args.warmup))


async def _wrk_with_warmup(
    options: WrkOptions, gateway: GatewayProcess, workload: Workload, warmup_s: int
) -> WrkResult:
    warmed = 0
    if warmup_s:
        # Unmeasured: fills the gateway's pools and caches at this concurrency. Other ids than the measured run.
        warm = await run_wrk(options, gateway.url, workload, duration_s=warmup_s, seed=options.seed + 1000)
        if warm.failures or not warm.requests:
            raise BenchError("warm-up failed: " + "; ".join(warm.problems()))
        warmed = warm.requests
    result = await run_wrk(options, gateway.url, workload, cpu_seconds=gateway.cpu_seconds)
    result.warmup_requests = warmed
    gateway.check_alive()
    log_result(result, workload.name)
    return result


async def _server_versions(redis_url: str, dsn: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    conn = await asyncpg.connect(dsn)
    try:
        pg = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {"redis": str(info.get("redis_version", "")), "postgresql": str(pg)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        try:
            print(compare(*args.compare))
            before, after = (load_record(path)["summary"] for path in args.compare)
        except ValueError as exc:
            print(f"bench: --compare: {exc}", file=sys.stderr)
            return 2
        print()
        print(targets(before, after))
        return 0
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fg-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    report = Report(meta=machine() | {"args": {k: str(v) for k, v in vars(args).items()}})
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by redis-server, the gateway and wrk
        except (PermissionError, OSError) as exc:
            print(f"bench: --nice {args.nice}: {exc}", file=sys.stderr)
            return 2
    started = time.monotonic()
    try:
        uvloop.run(run(args, report, log_dir))
    except BenchError as exc:
        report.problems.append(str(exc))
    except KeyboardInterrupt:
        report.problems.append("interrupted")
    report.meta["seconds"] = round(time.monotonic() - started, 1)
    report.meta["load_average_at_end"] = os.getloadavg()
    if report.workloads or report.storage:
        print(table(report.summary()))
        print()
        print(caption(report))
        for note in report.notes:
            print(f"\nNote: {note}")
        if args.baseline is not None and report.workloads:
            baseline = load_record(args.baseline)
            report.meta["baseline"] = str(args.baseline)
            print(f"\n## Against {args.baseline}\n")
            print(compare_summaries(baseline["summary"], report.summary(), baseline.get("meta"), report.meta))
            print()
            print(targets(baseline["summary"], report.summary()))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    if report.problems:
        for problem in report.problems:
            print(f"bench: FAILED: {problem}", file=sys.stderr)
        print(f"bench: logs kept in {log_dir}", file=sys.stderr)
        return 1
    if args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    log(f"done in {report.meta['seconds']} s")
    return 0
