"""Bulk loading (issue 16): the in-process loader against Spark `local[2]` on the same Parquet dataset.

    .venv/bin/python -m bench.spark_load [--rows 1000000] [--files 8] [--backend postgres|redis]
                                         [--batch-size 2000] [--master local[2]] [--smoke] [--json FILE]

1. A dataset of `--rows` rows in `--files` Parquet files (row groups of 50,000): group `history`, entity
   `consumer` (int64 ids 1..N), 25 int64 uniform 0-999 + 25 float64 features (the bench's shape), and an
   `event_timestamp` column. Generated with numpy from a seed; written once per run into a temporary folder.
2. The group lives on the machine's PostgreSQL (`type: cockroach, dialect: postgres`, a schema of our own,
   dropped before and after) or Redis (a key prefix of our own, deleted after).
3. In-process: `open_load` + `run_load` on the dataset directory, as `feature-gateway materialize DIR` runs it
   (validate with the write path's encode_row, batches stored while the next is read). Then the schema or keys are
   emptied, and Spark: a session on `--master` (started before the clock starts: a cluster's JVMs are up already),
   `spark.read.parquet(DIR)` and `write_features` (executors validate, encode and write).
4. Rows per second are wall time. CPU seconds are those of this process and every descendant (Spark's JVM and its
   Python workers), read from /proc (utime + stime of each live process plus what it reaped of its children,
   before and after), and separately those of the PostgreSQL server processes serving our connections
   (`PostgresSampler`; Redis: the server's INFO used_cpu_sys + used_cpu_user, shared with anything else using
   it). Every value of a sample of 2,000 rows is read back from the backend and compared, for both engines.
5. The executor count for a billion rows a day loaded within an hour: 1e9 / 3600 = 277,778 rows/s, divided by the
   rows/s one executor core gives (Spark's CPU-seconds per row on the client side, one core per executor, the
   store scaled apart), rounded up; and the same from the measured local[2] wall rate per core.

`--smoke` (CI): 20,000 rows in 2 files; exits 1 on any failure, never judges a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis.asyncio as aioredis

from bench.procs import BenchError, log

PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
INTS, FLOATS = 25, 25
ROWS_PER_DAY = 1_000_000_000
WITHIN_S = 3600
CLK_TCK = os.sysconf("SC_CLK_TCK")
BACKEND = "spark_bench_store"  # the backend's name: its PostgreSQL connections are `feature-gateway:<this>`


def registry_text(backend: str, schema: str, prefix: str) -> str:
    store = (
        f'{{type: cockroach, dsn: "{PG_DSN}", dialect: postgres, schema: {schema}, table: history}}'
        if backend == "postgres"
        else f'{{type: redis, url: "{REDIS_URL}", key_prefix: "{prefix}"}}'
    )
    features = "".join(f"      int_{i:02}: {{dtype: int64, default: 0}}\n" for i in range(INTS))
    features += "".join(f"      float_{i:02}: {{dtype: float64, default: 0.0}}\n" for i in range(FLOATS))
    return f"""
backends:
  {BACKEND}: {store}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  history:
    entity: consumer
    backend: {BACKEND}
    ttl: 30d
    features:
{features}"""


def write_dataset(folder: Path, rows: int, files: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    per_file = math.ceil(rows / files)
    moment = np.datetime64(int(time.time() * 1e6) - 600_000_000, "us")
    for part, start in enumerate(range(0, rows, per_file)):
        count = min(per_file, rows - start)
        columns: dict[str, Any] = {
            "consumer_id": pa.array(np.arange(start + 1, start + count + 1, dtype=np.int64)),
            "event_timestamp": pa.array(np.full(count, moment), pa.timestamp("us", tz="UTC")),
        }
        for i in range(INTS):
            columns[f"int_{i:02}"] = pa.array(rng.integers(0, 1000, count, dtype=np.int64))
        for i in range(FLOATS):
            columns[f"float_{i:02}"] = pa.array(rng.random(count) * 1000)
        pq.write_table(pa.table(columns), folder / f"part-{part:05}.parquet", row_group_size=50_000)


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, process group, CPU seconds: own user+sys plus its reaped children's)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # after ")": state ppid pgrp ... utime(12) stime(13) cutime(14) cstime(15), 0-based from state
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return int(fields[1]), int(fields[2]), ticks / CLK_TCK


def _processes() -> dict[int, tuple[int, float, str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                try:
                    comm = Path(f"/proc/{entry}/comm").read_text().strip()
                except OSError:
                    continue
                found[int(entry)] = (stat[0], stat[2], comm)
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and its live descendants, each with what it reaped of its own children: a process
    that ends meanwhile moves its total into its parent's, so the sum only grows, and counts nothing twice."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in procs:
            total += procs[pid][1]
            stack += children.get(pid, [])
    return total


class PostgresSampler:
    """The CPU seconds of the PostgreSQL server processes that serve our connections (application_name
    `feature-gateway:<our backend>`), found in pg_stat_activity every 0.1 s and read from /proc: the server is
    shared with whatever else runs on the machine, so its own totals would count others' work. A connection's last
    0.1 s before it closes can be missed (Spark's executors open theirs per partition): a slight undercount."""

    def __init__(self, application_name: str):
        self.application_name = application_name
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="pg-sampler", daemon=True)

    async def _run(self) -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            while not self.stop.is_set():
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1", self.application_name
                )
                for row in rows:
                    stat = _stat(row["pid"])
                    if stat is not None:
                        self.seen[row["pid"]] = max(self.seen.get(row["pid"], 0.0), stat[2])
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def __enter__(self) -> PostgresSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def cpu(self) -> float:
        return sum(self.seen.values())


async def redis_cpu() -> float:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        info = await client.info("cpu")
    finally:
        await client.aclose()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def empty(backend: str, schema: str, prefix: str) -> None:
    if backend == "postgres":
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
        return
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=5000)]
        for start in range(0, len(keys), 5000):
            await client.delete(*keys[start : start + 5000])
    finally:
        await client.aclose()


async def check_sample(registry_path: Path, first_file: Path) -> int:
    """Read 2,000 rows back from the backend (through the group's codec) and compare every value with the file."""
    from app.registry.load import load_registry
    from backends import open_backend

    registry = load_registry(registry_path, {})
    group = registry.groups["history"]
    table = pq.read_table(first_file)
    count: int = min(2000, table.num_rows)
    backend = open_backend(registry.backends[group.backend], registry)
    try:
        blobs = (await backend.read([(group, [str(i) for i in range(1, count + 1)])]))[0]
    finally:
        await backend.aclose()
    expected = table.slice(0, count).to_pylist()
    for row, blob in zip(expected, blobs, strict=True):
        if blob is None:
            raise BenchError(f"consumer {row['consumer_id']} was not stored")
        _, stored = group.codec.decode(blob)
        values = [stored[group.codec.stored_index[i]] for i in range(len(group.features))]
        want = [row[f.name] for f in group.features]
        if values != want:
            raise BenchError(f"consumer {row['consumer_id']} reads back {values[:4]}..., expected {want[:4]}...")
    return count


async def in_process(registry_path: Path, folder: Path, batch_size: int) -> dict[str, Any]:
    from app.loading.load import open_load, run_load
    from app.registry.load import load_registry
    from app.serving.limits import Limits

    registry = load_registry(registry_path, {})
    load = open_load(registry, "history", folder, limits=Limits(), batch_size=batch_size, restart=True)
    report = await run_load(load)
    if report.rejected or report.written != report.rows:
        raise BenchError(f"in-process: {report.lines()}")
    return {"rows": report.rows}


def spark_session(master: str) -> Any:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(master)
        .appName("bench.spark_load")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "1g")
        .config("spark.sql.session.timeZone", "UTC")
        # Tasks of at most 32 MiB of Parquet: enough of them to keep every core busy to the end
        .config("spark.sql.files.maxPartitionBytes", str(32 << 20))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def measure(name: str, backend: str, run: Any) -> dict[str, Any]:
    sampler = PostgresSampler(f"feature-gateway:{BACKEND}")
    store0 = asyncio.run(redis_cpu()) if backend == "redis" else 0.0
    with sampler:
        cpu0, wall0 = tree_cpu(os.getpid()), time.monotonic()
        result = run()
        wall = time.monotonic() - wall0
        cpu = tree_cpu(os.getpid()) - cpu0
    store = asyncio.run(redis_cpu()) - store0 if backend == "redis" else sampler.cpu()
    rows = result["rows"]
    figures = {
        "rows": rows,
        "seconds": round(wall, 2),
        "rows_per_s": round(rows / wall),
        "client_cpu_s_per_million": round(cpu / rows * 1e6, 1),
        "store_cpu_s_per_million": round(store / rows * 1e6, 1),
    }
    log(f"{name}: {figures}")
    return figures


def executors(figures: dict[str, Any], cores: int) -> dict[str, Any]:
    needed = ROWS_PER_DAY / WITHIN_S
    per_core_cpu = 1e6 / figures["client_cpu_s_per_million"]
    per_core_wall = figures["rows_per_s"] / cores
    return {
        "rows_per_s_needed": round(needed),
        "rows_per_s_per_executor_core_by_cpu": round(per_core_cpu),
        "executors_by_cpu": math.ceil(needed / per_core_cpu),
        "rows_per_s_per_core_measured": round(per_core_wall),
        "executors_by_measured_rate": math.ceil(needed / per_core_wall),
        "store_cores_needed": math.ceil(needed * figures["store_cpu_s_per_million"] / 1e6),
    }


def table(out: dict[str, Any]) -> str:
    lines = [
        f"{out['rows']:,} rows, {out['files']} Parquet files, 25 int64 + 25 float64 features, into {out['backend']}, "
        f"batches of {out['batch_size']:,}",
        "",
        "| engine | rows/s | seconds | client CPU s / 1M rows | store CPU s / 1M rows |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("in-process", f"spark {out['master']}"):
        f = out[name]
        lines.append(
            f"| {name} | {f['rows_per_s']:,} | {f['seconds']} | {f['client_cpu_s_per_million']} | "
            f"{f['store_cpu_s_per_million']} |"
        )
    e = out["executors"]
    lines += [
        "",
        f"1e9 rows in an hour = {e['rows_per_s_needed']:,} rows/s. One executor core at Spark's client CPU cost: "
        f"{e['rows_per_s_per_executor_core_by_cpu']:,} rows/s -> {e['executors_by_cpu']} single-core executors; "
        f"at the measured local rate per core ({e['rows_per_s_per_core_measured']:,} rows/s, the store on the same "
        f"cores): {e['executors_by_measured_rate']}. The store then needs about {e['store_cores_needed']} cores "
        "at the CPU cost measured here.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--backend", choices=["postgres", "redis"], default="postgres")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="20,000 rows in 2 files (CI: never judged)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.files = 20_000, 2
    cores = int(args.master.removeprefix("local[").split(",")[0].rstrip("]")) if args.master.startswith("local[") else 1
    schema, prefix = f"fg_spark_bench_{os.getpid()}", f"fg_spark_bench:{os.getpid()}:"
    out: dict[str, Any] = {
        "rows": args.rows,
        "files": args.files,
        "backend": args.backend,
        "batch_size": args.batch_size,
        "master": args.master,
    }
    failure = None
    with tempfile.TemporaryDirectory() as tmp:
        folder, registry_path = Path(tmp, "dataset"), Path(tmp, "registry.yaml")
        folder.mkdir()
        registry_path.write_text(registry_text(args.backend, schema, prefix))
        spark = None
        try:
            log(f"writing {args.rows:,} rows into {args.files} Parquet files")
            write_dataset(folder, args.rows, args.files, args.seed)
            asyncio.run(empty(args.backend, schema, prefix))
            out["in-process"] = measure(
                "in-process", args.backend, lambda: asyncio.run(in_process(registry_path, folder, args.batch_size))
            )
            asyncio.run(check_sample(registry_path, folder / "part-00000.parquet"))
            asyncio.run(empty(args.backend, schema, prefix))
            log(f"starting Spark on {args.master}")
            spark = spark_session(args.master)
            from app import write_features

            def spark_load() -> dict[str, Any]:
                result = write_features(
                    spark.read.parquet(str(folder)), "history", registry=registry_path, batch_size=args.batch_size
                )
                if result["rejected"] or result["written"] != args.rows:
                    raise BenchError(f"spark: {result}")
                return dict(result)

            out[f"spark {args.master}"] = measure(f"spark {args.master}", args.backend, spark_load)
            asyncio.run(check_sample(registry_path, folder / "part-00000.parquet"))
            out["executors"] = executors(out[f"spark {args.master}"], cores)
        except (BenchError, OSError, asyncpg.PostgresError) as exc:
            failure = str(exc)
        finally:
            if spark is not None:
                spark.stop()
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                asyncio.run(empty(args.backend, schema, prefix))
    if failure is not None:
        log(f"FAILED: {failure}")
        raise SystemExit(1)
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
