"""write_features from a real PySpark DataFrame (Spark `local[2,4]`, its own JVM and Python workers) straight into
the real Redis and PostgreSQL, read back through the gateway; a killed task retried by Spark; materialize --engine
spark on a Parquet dataset. One Spark session for the module: it takes ~10 s to start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app import write_features
from app.metrics import Metrics
from tests.support.clients import live_row, write
from tests.support.frames import (
    BAD_EMBEDDING,
    LIVE_FEATURES,
    T0,
    fetch_all,
    local_spark,
    served,
    spark_live_rows,
)
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

pytestmark = pytest.mark.timeout(240)

ROWS = 200_000
STALE = 100  # consumers 1..100 hold a newer row before the job: the job's rows for them are skipped as stale


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with local_spark("test_spark_load") as session:
        yield session


def registry_file(names: Names, kind: str) -> Path:
    path = names.dir / "registry.yaml"
    path.write_text(names.registry(names.backend(kind)))
    return path


def newer(consumer: int) -> dict[str, Any]:
    """A row of `consumer` a minute newer than the DataFrame's."""
    return live_row(consumer, 999, at=(T0 + timedelta(minutes=1)).isoformat().replace("+00:00", "Z"))


@pytest.mark.parametrize("kind", ["redis", "cockroach"])
async def test_a_dataframe_is_written_by_the_executors_and_every_value_reads_back(
    spark: Any, gateway: GatewayFactory, names: Names, kind: str
) -> None:
    registry = registry_file(names, kind)
    async with gateway(registry.read_text()) as client:
        await write(client, "live", [newer(c) for c in range(1, STALE + 1)])
    df = spark_live_rows(spark, ROWS, 4)
    result = await asyncio.to_thread(write_features, df, "live", registry=registry, batch_size=2000)
    assert result == {
        "rows": ROWS,
        "written": ROWS - STALE - 1,
        "skipped_stale": STALE,
        "rejected": 1,
        # row i is consumer i + 1, row i + 1 of partition 0 (spark.range gives each partition a run of 50,000 ids)
        "reasons": [f"partition 0, row {BAD_EMBEDDING + 1}: embedding: expected 3 items (float32[3]), got 2"],
    }
    async with gateway(registry.read_text()) as client:
        got = await fetch_all(client, list(range(1, ROWS + 1)), ["live:*"])
    assert len(got) == ROWS
    mismatched = []
    for i, row in enumerate(got):
        if i < STALE:
            expected = [newer(i + 1)[name] for name in LIVE_FEATURES]
        elif i == BAD_EMBEDDING:
            expected = [0, 0.5, False, "none", None, None, [0, 0]]  # never stored: the defaults
        else:
            expected = served(i)
        if row["values"] != expected:
            mismatched.append((i, row["values"], expected))
    assert mismatched == []


async def test_a_task_killed_midway_is_retried_and_the_counts_stay_exact(
    spark: Any, gateway: GatewayFactory, names: Names
) -> None:
    """Partition 0's first attempt dies (its worker process exits) after storing 3 of its batches; Spark runs the
    task again, which stores them again. Only the successful attempt's counts are collected."""
    registry = registry_file(names, "cockroach")
    rows = 20_000
    df = spark_live_rows(spark, rows, 4)

    def job() -> Any:
        spark.sparkContext.setJobGroup("retried", "a task killed once")  # (a property of the thread)
        return write_features(df, "live", registry=registry, batch_size=1000, _crash_first_attempt_after=3)

    result = await asyncio.to_thread(job)
    tracker = spark.sparkContext.statusTracker()
    failed = 0
    for job in tracker.getJobIdsForGroup("retried"):
        info = tracker.getJobInfo(job)
        for stage in info.stageIds if info else []:
            stage_info = tracker.getStageInfo(stage)
            failed += stage_info.numFailedTasks if stage_info else 0
    assert failed == 1, "the first attempt of partition 0 should have failed once"
    assert result == {
        "rows": rows,
        "written": rows - 1,
        "skipped_stale": 0,
        "rejected": 1,
        "reasons": [f"partition 0, row {BAD_EMBEDDING + 1}: embedding: expected 3 items (float32[3]), got 2"],
    }
    async with gateway(registry.read_text()) as client:
        got = await fetch_all(client, list(range(1, rows + 1)), ["live:*"])
    assert [row["values"] for i, row in enumerate(got) if i != BAD_EMBEDDING] == [
        served(i) for i in range(rows) if i != BAD_EMBEDDING
    ]


def test_a_parquet_dataset_loads_through_spark_from_the_command_line(spark: Any, names: Names) -> None:
    """`materialize DIR --engine spark --master local[2]`: a Hive-partitioned dataset Spark wrote itself."""
    registry = registry_file(names, "cockroach")
    dataset = names.dir / "live"
    df = spark_live_rows(spark, 5_000, 2).selectExpr("*", "CAST(consumer_id % 3 AS INT) AS bucket")
    df.write.partitionBy("bucket").parquet(str(dataset))
    assert (dataset / "_SUCCESS").exists()
    shared = names.dir / "metrics"
    shared.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "app", "materialize", str(dataset), "--group", "live", "--registry", str(registry)]
        + ["--engine", "spark", "--master", "local[2]", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable, "GATEWAY_METRICS_DIR": str(shared)},
    )
    assert done.returncode == 3, done.stderr  # 3: finished, a row rejected
    assert f"{dataset} -> live: 5,000 rows: 4,999 written, 0 skipped as stale, 1 rejected" in done.stdout
    assert "embedding: expected 3 items (float32[3]), got 2" in done.stdout
    # The driver's exact sums, where a gateway sharing the folder merges them into /v1/usage and /metrics
    writes = Metrics(str(shared)).merged().writes
    assert {k: v[:3] for k, v in writes.items()} == {("live", "spark"): [4999, 0, 1]}
