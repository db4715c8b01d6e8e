"""write_features from a pandas DataFrame (in this process) and materialize of a Parquet dataset directory, on the
real backends; and the proof that the gateway itself loads neither pandas nor pyspark."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app import write_features
from app.loading.errors import MaterializeError
from app.loading.load import open_load, run_load
from app.registry.load import parse_registry
from app.serving.limits import Limits
from tests.support.frames import BAD_EMBEDDING, fetch_all, live_value, served
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names


def registry_file(names: Names, kind: str) -> Path:
    path = names.dir / "registry.yaml"
    path.write_text(names.registry(names.backend(kind)))
    return path


def frame(count: int) -> pd.DataFrame:
    return pd.DataFrame([live_value(i) for i in range(count)])


def test_the_gateway_and_the_command_line_load_neither_pandas_nor_pyspark() -> None:
    code = (
        "import sys, app, app.main, app.cli, app.loading.frames, app.loading.watch; "
        "app.main.create_app; app.write_features; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'pandas', 'py4j')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["redis", "cockroach", "sqlite"])
def test_a_pandas_dataframe_is_written_and_every_value_reads_back(
    gateway: GatewayFactory, names: Names, kind: str
) -> None:
    registry = registry_file(names, kind)
    rows = 5_000
    result = write_features(frame(rows), "live", registry=registry, batch_size=700)
    assert result == {
        "rows": rows,
        "written": rows - 1,
        "skipped_stale": 0,
        "rejected": 1,
        "reasons": [f"row {BAD_EMBEDDING + 1}: embedding: expected 3 items (float32[3]), got 2"],
    }

    async def read() -> list[dict[str, Any]]:
        async with gateway(registry.read_text()) as client:
            return await fetch_all(client, list(range(1, rows + 1)), ["live:*"])

    got = asyncio.run(read())
    assert [r["values"] for i, r in enumerate(got) if i != BAD_EMBEDDING] == [
        served(i) for i in range(rows) if i != BAD_EMBEDDING
    ]
    again = write_features(frame(rows), "live", registry=registry)  # the same rows again: same time, rewritten
    assert (again["written"], again["skipped_stale"]) == (rows - 1, 0)


async def test_from_inside_an_event_loop_rows_without_time_get_the_calls_time_and_stale_rows_are_counted(
    gateway: GatewayFactory, names: Names
) -> None:
    """As in a notebook, whose loop is running: the write runs in a thread of its own."""
    registry = registry_file(names, "cockroach")
    first = frame(20).drop(columns=["event_timestamp"])
    assert write_features(first, "live", registry=registry)["written"] == 20
    older = frame(20)  # event times 10 minutes ago: older than the call's time the first rows got
    older["orders_7d"] = 7
    result = write_features(older, "live", registry=registry)
    assert (result["written"], result["skipped_stale"], result["rejected"]) == (0, 20, 0)
    async with gateway(registry.read_text()) as client:
        got = await fetch_all(client, [1, 2], ["live:orders_7d"])
    assert [r["values"] for r in got] == [[0], [1]]  # the first frame's, not 7


def test_a_frame_whose_columns_do_not_fit_the_group_is_refused_before_writing(names: Names) -> None:
    registry = registry_file(names, "sqlite")
    with pytest.raises(MaterializeError, match="no column for 'ids'"):
        write_features(frame(3).drop(columns=["ids"]), "live", registry=registry)
    with pytest.raises(MaterializeError, match="column 'extra' not in group live"):
        write_features(frame(3).assign(extra=1), "live", registry=registry)
    with pytest.raises(MaterializeError, match="unknown group 'nope'"):
        write_features(frame(3), "nope", registry=registry)


def write_dataset(root: Path, rows: int, *, hive: bool) -> None:
    """`rows` rows of the live group over several files, under `dt=` folders when `hive`."""
    table = pa.Table.from_pandas(frame(rows), preserve_index=False)
    for part, start in enumerate(range(0, rows, 400)):
        folder = root / f"dt=2026-11-{20 + part % 3}" if hive else root
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(start, 400), folder / f"part-{part:03}.parquet", row_group_size=150)
    (root / "_SUCCESS").touch()
    (root / ".part-000.parquet.crc").write_bytes(b"not parquet")


@pytest.mark.parametrize("hive", [False, True])
async def test_a_parquet_dataset_directory_loads_in_process_and_resumes(
    gateway: GatewayFactory, names: Names, hive: bool
) -> None:
    root = names.dir / "dataset"
    rows = 2_000
    write_dataset(root, rows, hive=hive)
    registry = parse_registry(names.registry(names.backend("cockroach")), "test-registry", env={})
    load = open_load(registry, "live", root, limits=Limits(), batch_size=333)
    assert load.source.fraction(0) == 0.0
    first = load.prepared()
    batch = next(first)
    assert batch.last_row == 333
    load.source.close()
    # A checkpoint that says 1,234 rows were done: the rerun skips whole files and row groups up to there
    load.checkpoint.rows_done = 1_234
    from app.loading.checkpoint import save_checkpoint

    save_checkpoint(load.checkpoint_path, load.checkpoint)
    resumed = open_load(registry, "live", root, limits=Limits(), batch_size=333)
    assert resumed.checkpoint.rows_done == 1_234
    report = await run_load(resumed)
    assert (report.rows, report.written, report.rejected) == (rows, rows - 1_234, 0)
    # then the whole of it, from the start
    report = await run_load(open_load(registry, "live", root, limits=Limits(), batch_size=333, restart=True))
    assert (report.rows, report.written, report.skipped_stale, report.rejected) == (rows, rows, 0, 0)
    async with gateway(names.registry(names.backend("cockroach"))) as client:
        got = await fetch_all(client, list(range(1, rows + 1)), ["live:*"])
    assert [r["values"] for r in got] == [served(i) for i in range(rows)]


async def test_event_times_in_any_zone_are_the_same_instant_and_nanoseconds_are_refused_as_over_http(
    gateway: GatewayFactory, names: Names
) -> None:
    registry = registry_file(names, "sqlite")
    base = pd.Timestamp.now(tz="Europe/Paris").floor("s") - pd.Timedelta(minutes=5)
    df = frame(3)
    df["event_timestamp"] = [base, base + pd.Timedelta(milliseconds=500), base + pd.Timedelta(nanoseconds=1)]
    assert str(df["event_timestamp"].dtype) == "datetime64[ns, Europe/Paris]"
    result = write_features(df, "live", registry=registry)
    assert (result["written"], result["rejected"]) == (2, 1)
    assert result["reasons"][0].startswith("row 3: event_timestamp: ")
    assert "is more precise than a microsecond" in result["reasons"][0]
    utc = base.tz_convert("UTC")
    text = registry.read_text()
    async with gateway(text) as client:
        answer = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1, 2]}, "features": ["live:orders_7d"], "include_timestamps": True},
        )
    assert [row["event_timestamps"][0] for row in answer.json()["rows"]] == [
        utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        utc.strftime("%Y-%m-%dT%H:%M:%S.500000Z"),
    ]
