"""`write_features(df, group, registry=...)`: a pandas or PySpark DataFrame written straight into a group's
backend, validated and encoded exactly as POST /v1/features/write does, with no gateway in between.

One mechanism for every writer: rows come out of Arrow record batches (`sources.arrow_rows`, as a Parquet file's
do), are checked and encoded one by one by the write path's `encode_row` (`load.prepare`: a bad row becomes a
reason naming its row, field and why, and the rest of its batch is written), and stored with the backend's
batch write through `app.serving.write.store` (the circuit, timeout, the group's cache and a move's second copy,
as for the endpoint), retried a few times.

Spark: `DataFrame.mapInArrow` hands each partition's rows to a Python worker on an executor as Arrow batches.
The worker opens its own connections to the group's backends from the registry's text (the registry, not live
objects, is what travels), runs an asyncio loop, writes batches of `batch_size`, and answers one row of counts;
the driver collects and sums them. Collected results are those of each partition's successful attempt only, so
the counts are exact even when Spark retries a task (accumulators updated inside a transformation are not).
A retried task writes its rows again, which is harmless: a row never replaces a newer one, and every row
without `event_timestamp` gets one event time chosen by the driver for the whole job, so a replayed row carries
the same time and bytes as the one stored (and is counted written again by the attempt that counts).

pandas: the same, in this process, one batch after another.

Nothing here imports pyspark or pandas at module level: the gateway never loads them, and
`pip install feature-gateway[spark]` brings them to those who write from DataFrames.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import msgspec

from app.loading.errors import MaterializeError
from app.loading.load import MAX_REASONS, Prepared, prepare, store_with_retries
from app.loading.sources import arrow_rows, check_columns
from app.registry.load import parse_registry
from app.registry.model import Group, Registry
from app.serving.limits import Limits
from backends.base import WriteResult

COUNTS_SCHEMA = "rows long, written long, skipped_stale long, rejected long, reasons string"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


class WriteFeaturesResult(TypedDict):
    """What `write_features` did: every row of the DataFrame is in exactly one of the three counts."""

    rows: int
    written: int  # stored (a row replayed by a retried task is stored again, and counted once)
    skipped_stale: int  # refused by the never-older rule: the store (or the same batch) held a newer row
    rejected: int  # failed the write path's checks; nothing of them was stored
    reasons: list[str]  # the first rejections: "partition P, row N: field: why"


class Counts(msgspec.Struct):
    rows: int = 0
    written: int = 0
    skipped_stale: int = 0
    rejected: int = 0
    reasons: list[str] = msgspec.field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.written += other.written
        self.skipped_stale += other.skipped_stale
        self.rejected += other.rejected
        self.reasons += other.reasons[: max(MAX_REASONS - len(self.reasons), 0)]

    def result(self) -> WriteFeaturesResult:
        return {
            "rows": self.rows,
            "written": self.written,
            "skipped_stale": self.skipped_stale,
            "rejected": self.rejected,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Target:
    """Everything an executor needs to write a partition, picklable: the registry as text (with the values of the
    variables it names, read on the driver), the group, the job's event time for rows without one."""

    registry_text: str
    registry_source: str
    env: dict[str, str]
    group: str
    default_us: int
    batch_size: int = 2000
    retries: int = 3
    limits: Limits = field(default_factory=Limits)
    # Tests only: the first attempt of partition 0 dies (os._exit, as a killed worker) after this many batches
    crash_first_attempt_after: int | None = None

    def registry(self) -> Registry:
        return parse_registry(self.registry_text, self.registry_source, self.env)


def target_for(
    registry: str | os.PathLike[str],
    group: str,
    *,
    batch_size: int = 2000,
    retries: int = 3,
    limits: Limits | None = None,
    crash_first_attempt_after: int | None = None,
) -> tuple[Target, Group]:
    """Read and check the registry and group on the driver, before any task starts."""
    path = Path(registry)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MaterializeError(f"registry {path}: cannot read: {exc.strerror or exc}") from None
    env = {name: os.environ[name] for name in _VARIABLE.findall(text) if name in os.environ}
    if batch_size < 1:
        raise MaterializeError("batch_size must be at least 1")
    target = Target(
        text,
        str(path),
        env,
        group,
        time.time_ns() // 1000,
        batch_size,
        retries,
        limits or Limits(),
        crash_first_attempt_after,
    )
    found = target.registry().groups.get(group)
    if found is None:
        raise MaterializeError(f"unknown group {group!r}; groups: {', '.join(target.registry().groups)}")
    if found.streaming is not None:
        raise MaterializeError(
            f"{found.name} aggregates stream {found.streaming.stream}: send its events, not rows of features"
        )
    return target, found


def _prepared(target: Target, group: Group, source: Iterable[Any], where: str) -> Iterator[tuple[int, Prepared]]:
    """Each batch of `target.batch_size` rows validated and encoded: (rows in it, what to store and what failed)."""
    done = 0
    for record_batch in source:
        for start in range(0, record_batch.num_rows, target.batch_size):
            rows = arrow_rows(record_batch.slice(start, target.batch_size), done)
            done += len(rows)
            yield len(rows), prepare(group, rows, target.limits, target.default_us, where)


async def write_batches(target: Target, record_batches: Iterable[Any], where: str = "", crash: bool = False) -> Counts:
    """Validate, encode and store Arrow record batches into the target group; the counts of what happened. The
    next batch is read and validated in a thread while the current one is stored (as the in-process loader does).

    Raises BackendFailed when a batch cannot be stored after the retries (Spark then fails the task and
    retries it; its rows so far are replayed harmlessly)."""
    from app.serving.gateway import Gateway
    from backends import open_backend

    registry = target.registry()
    group = registry.groups[target.group]
    opened = {name: open_backend(registry.backends[name], registry) for name in group.backends}
    gw = Gateway(registry, opened, limits=target.limits)
    counts = Counts()
    stored = 0
    batches = _prepared(target, group, record_batches, where)
    pending: asyncio.Future[tuple[int, Prepared] | None] | None = None
    try:
        pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
        while (item := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))  # read ahead while storing
            size, batch = item
            result = await store_with_retries(gw, group, batch.rows, target.retries) if batch.rows else None
            result = result or WriteResult(0, 0)
            counts.rows += size
            counts.written += result.written
            counts.skipped_stale += result.skipped_stale + batch.dropped
            counts.rejected += len(batch.reasons)
            counts.reasons += batch.reasons[: max(MAX_REASONS - len(counts.reasons), 0)]
            stored += 1
            if crash and stored == target.crash_first_attempt_after:
                os._exit(17)  # a killed worker, for the retry test: nothing is cleaned up
        pending = None
    finally:
        if pending is not None:  # a read-ahead still running in its thread must end before its source does
            await asyncio.gather(pending, return_exceptions=True)
        await gw.aclose()
    return counts


def _run(coroutine: Any) -> Any:
    """asyncio.run, also from inside a running loop (a notebook): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    answer: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            answer.append(asyncio.run(coroutine))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="write_features")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return answer[0]


def _partition(target: Target) -> Any:
    """The function Spark runs on each partition (shipped by cloudpickle: a closure over `target` only)."""

    def run(record_batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        crash = (
            target.crash_first_attempt_after is not None
            and context is not None
            and partition == 0
            and context.attemptNumber() == 0
        )
        counts: Counts = asyncio.run(write_batches(target, record_batches, f"partition {partition}", crash))
        row = counts.result()
        yield pa.RecordBatch.from_pylist([{**row, "reasons": msgspec.json.encode(row["reasons"]).decode()}])

    return run


def _is_spark(df: Any) -> bool:
    return any(cls.__module__.startswith("pyspark.") and cls.__name__ == "DataFrame" for cls in type(df).__mro__)


def write_features(
    df: Any,
    group: str,
    *,
    registry: str | os.PathLike[str],
    batch_size: int = 2000,
    retries: int = 3,
    limits: Limits | None = None,
    _crash_first_attempt_after: int | None = None,
) -> WriteFeaturesResult:
    """Write a pandas or PySpark DataFrame's rows into `group`, as POST /v1/features/write would.

    The DataFrame has the group's join key, every feature (null for no value) and optionally `event_timestamp`
    (a timestamp, or RFC 3339 text; rows without one get the time this call started). `registry`: the registry
    YAML file (read here, on the driver; `${VAR}`s take the driver's environment). Bad rows are counted and the
    first reasons returned, never failing the job; a backend that stays down fails it (a rerun is harmless).
    """
    target, found = target_for(
        registry,
        group,
        batch_size=batch_size,
        retries=retries,
        limits=limits,
        crash_first_attempt_after=_crash_first_attempt_after,
    )
    _run(migrate(target))
    if _is_spark(df):
        return write_spark(df, target, found)
    return write_pandas(df, target, found)


def write_pandas(df: Any, target: Target, group: Group) -> WriteFeaturesResult:
    import pyarrow as pa

    check_columns(group, [str(c) for c in df.columns], "DataFrame")
    table = pa.Table.from_pandas(df, preserve_index=False)
    counts: Counts = _run(write_batches(target, table.to_batches(max_chunksize=target.batch_size)))
    return counts.result()


def write_spark(df: Any, target: Target, group: Group) -> WriteFeaturesResult:
    check_columns(group, list(df.columns), "DataFrame")
    total = Counts()
    for row in df.mapInArrow(_partition(target), COUNTS_SCHEMA).collect():
        total.add(
            Counts(
                row["rows"],
                row["written"],
                row["skipped_stale"],
                row["rejected"],
                msgspec.json.decode(row["reasons"]),
            )
        )
    return total.result()


async def migrate(target: Target) -> None:
    """On the driver, once: the group's tables exist before any executor writes (idempotent)."""
    from app.errors import BackendFailed
    from backends import open_backend

    registry = target.registry()
    group = registry.groups[target.group]
    for name in group.backends:
        backend = open_backend(registry.backends[name], registry)
        try:
            async with asyncio.timeout(max(target.limits.write_timeout_ms / 1000, 5.0)):
                await backend.migrate()
        except Exception as exc:
            raise BackendFailed(
                f"backend {name} ({backend.type}) does not answer: {type(exc).__name__}: {exc}"[:400], field="group"
            ) from None
        finally:
            await backend.aclose()


class SparkJobFailed(Exception):
    """The Spark job failed (a task failed as many times as spark.task.maxFailures allows); the message is the
    first line of its error. Rows stored before it stay stored, and a rerun rewrites them harmlessly."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "BackendFailed" in line or "Error:" in line:
            return line.strip()[:500]
    return (text.splitlines() or [type(exc).__name__])[0][:500]


def spark_materialize(
    registry: str | os.PathLike[str],
    group: str,
    path: str,
    *,
    master: str | None,
    batch_size: int = 2000,
    retries: int = 3,
    limits: Limits | None = None,
) -> Any:
    """`feature-gateway materialize PATH --engine spark`: a Parquet file or dataset (Hive-partitioned or not) read
    by Spark and written by its executors with `write_features`. Returns the load's `Report`.

    `master`: `local[N]`, `spark://host:7077`, `yarn`, ... (None: what spark-submit or spark-defaults say). On a
    cluster every executor needs feature-gateway installed (`pip install feature-gateway`), and PATH must be
    where they can read it (s3a://, hdfs://, a shared mount). Unlike the in-process loader it keeps no
    checkpoint: a failed job is rerun whole, which rewrites the same rows harmlessly."""
    import sys

    from app.loading.load import Report

    target, found = target_for(registry, group, batch_size=batch_size, retries=retries, limits=limits)
    if Path(path).suffix.lower() in (".csv", ".jsonl", ".ndjson", ".gz"):
        raise MaterializeError(f"{path}: --engine spark reads Parquet; load CSV and JSON Lines without it")
    if master is None or master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local workers run this interpreter (its venv)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise MaterializeError("--engine spark needs pyspark: pip install 'feature-gateway[spark]'") from None
    builder = SparkSession.builder.appName(f"feature-gateway materialize {group}")
    if master:
        builder = builder.master(master)
    spark = builder.getOrCreate()
    started = time.monotonic()
    try:
        try:
            df = spark.read.parquet(path)
        except Exception as exc:  # pyspark's AnalysisException: no such path, not Parquet
            raise MaterializeError(f"{path}: Spark cannot read it as Parquet: {_first_line(exc)}") from None
        files = df.inputFiles()
        wanted = {found.entity.join_key, "event_timestamp", *found.by_name}
        partitioned = [c for c in df.columns if c not in wanted and any(f"/{c}=" in f for f in files)]
        df = df.drop(*partitioned)  # where the rows were put (a date), not a feature
        _run(migrate(target))
        try:
            result = write_spark(df, target, found)
        except MaterializeError:
            raise
        except Exception as exc:  # a task that failed spark.task.maxFailures times: its Python error, in Java's
            raise SparkJobFailed(_first_line(exc)) from None
    finally:
        spark.stop()
    return Report(
        group=group,
        file=Path(path),
        rows=result["rows"],
        written=result["written"],
        skipped_stale=result["skipped_stale"],
        rejected=result["rejected"],
        reasons=result["reasons"],
        resumed_from=0,
        checkpoint=Path(),
        seconds=time.monotonic() - started,
        rows_this_run=result["rows"],
    )
