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
  4. 32 connections, 1 x 100, for each `--workers` count (the gateway restarted with that many);
  5. the table on stdout, `--json FILE` with everything; then everything stopped
     and the schema dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
import uvloop

from app.errors import RegistryError
from app.registry.load import load_registry
from app.registry.model import Registry
from bench.data import entity_ids, generate, verify, write_rows
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
from bench.report import Report, Storage, caption, compare, table

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
    finally:
        await redis_client.aclose()
    log("read back a sample: every value PRESENT and as written")

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
            workload = Workload(f"{size} x {len(features)}, 1 conn, 1 worker", size, features, 1, 1, args.duration)
            for _ in range(args.repeat):  # gateway then floor, back to back: each pair sees the same box
                report.record(await _wrk_with_warmup(wrk_options, gateway, workload, args.warmup))
                floor_result = await floor.run(size, id_max, args.duration, args.warmup, args.seed)
                report.record(floor_result)
                log_result(floor_result, f"floor {size} x {len(features)}")

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
    finally:
        if floor is not None:
            await floor.aclose()
        if gateway is not None:
            gateway.stop()
        redis_server.stop()
        if not args.keep:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await drop_schema(args.pg_dsn, args.pg_schema)


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
        print(compare(*args.compare))
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
