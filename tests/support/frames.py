"""Loading from DataFrames and folders: the `live` group's rows derived from a number (as a Spark expression,
as Python values and as the gateway serves them), a local Spark session, and reading every loaded value back
through a gateway."""

from __future__ import annotations

import base64
import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.serving.limits import Limits

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)  # within the live group's 1h ttl
T0_US = int(T0.timestamp()) * 1_000_000
LIVE_FEATURES = ["orders_7d", "avg_basket", "active", "name", "raw", "embedding", "ids"]
BAD_EMBEDDING = 4243  # this row's embedding has two numbers; float32[3] wants three: rejected, named


def live_value(i: int) -> dict[str, Any]:
    """Row `i` (from 0) of the `live` group: consumer i + 1, every value derived from i."""
    return {
        "consumer_id": i + 1,
        "event_timestamp": T0,
        "orders_7d": i % 50,
        "avg_basket": (i % 50) * 0.5,
        "active": i % 2 == 0,
        "name": None if i % 5 == 0 else f"c{i}",
        "raw": bytes([i % 256]),
        "embedding": None if i % 7 == 0 else ([1.0, 2.0] if i == BAD_EMBEDDING else [0.25, -1.5, float(i % 9)]),
        "ids": [i, -i],
    }


def served(i: int) -> list[Any]:
    """Row `i` as the gateway serves `live:*` (a null name is served as its default, "none")."""
    row = live_value(i)
    return [
        row["orders_7d"],
        row["avg_basket"],
        row["active"],
        row["name"] or "none",
        base64.b64encode(row["raw"]).decode(),
        row["embedding"],
        row["ids"],
    ]


def spark_live_rows(spark: Any, count: int, partitions: int) -> Any:
    """`live_value(i)` for i < count as a Spark DataFrame, computed by Spark (no Python per row)."""
    return spark.range(0, count, 1, partitions).selectExpr(
        "id + 1 AS consumer_id",
        f"timestamp_micros({T0_US}) AS event_timestamp",
        "id % 50 AS orders_7d",
        "CAST(id % 50 AS DOUBLE) * 0.5 AS avg_basket",
        "id % 2 = 0 AS active",
        "CASE WHEN id % 5 = 0 THEN NULL ELSE concat('c', CAST(id AS STRING)) END AS name",
        "unhex(lpad(hex(id % 256), 2, '0')) AS raw",
        "CASE WHEN id % 7 = 0 THEN NULL "
        f"WHEN id = {BAD_EMBEDDING} THEN array(CAST(1.0 AS FLOAT), CAST(2.0 AS FLOAT)) "
        "ELSE array(CAST(0.25 AS FLOAT), CAST(-1.5 AS FLOAT), CAST(id % 9 AS FLOAT)) END AS embedding",
        "array(id, -id) AS ids",
    )


@contextlib.contextmanager
def local_spark(app_name: str) -> Iterator[Any]:
    """A SparkSession on `local[2,4]`: two cores, and a failed task tried up to 4 times (plain `local[2]` never
    retries). Its Python workers run this interpreter (the venv), its clock is UTC."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2,4]")
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.memory", "1g")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()


async def fetch_all(client: httpx.AsyncClient, ids: list[int], features: list[str]) -> list[dict[str, Any]]:
    """Every row of `ids`, `Limits().max_entities` per request."""
    rows: list[dict[str, Any]] = []
    step = Limits().max_entities
    for start in range(0, len(ids), step):
        response = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": ids[start : start + step]}, "features": features, "deadline_ms": 5000},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert not answer["degraded"]
        rows += answer["rows"]
    return rows
