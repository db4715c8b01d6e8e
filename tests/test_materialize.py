"""Bulk materialize on the real SQLite, PostgreSQL (and Redis) backends: formats, typing, rejects, stale, resume."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.cli import ProgressBar as Progress
from app.errors import BackendFailed, ValidationFailed
from app.loading.checkpoint import Checkpoint, default_checkpoint
from app.loading.csv_typing import CsvTyping, from_text
from app.loading.errors import MaterializeError
from app.loading.load import Report, open_load, run_load
from app.loading.sources import detect_format
from app.registry.load import parse_registry
from app.registry.model import Registry
from app.serving.limits import Limits
from app.storage.codec import CodecError, parse_dtype
from backends import open_backend
from tests.support.gateways import GatewayFactory
from tests.support.registries import PG_DSN, Names

FORMATS = ["csv", "jsonl", "parquet"]
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)  # within the live group's 1h ttl


# -- typing CSV text -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "text", "value"),
    [
        ("int64", "3", 3),
        ("int64", " -42 ", -42),
        ("int64", "+7", 7),
        ("int64", "", None),
        ("float64", "2.5", 2.5),
        ("float64", "1e-3", 0.001),
        ("float64", "4", 4.0),
        ("bool", "true", True),
        ("bool", "FALSE", False),
        ("bool", "1", True),
        ("bool", "no", False),
        ("string", " thai ", " thai "),
        ("string", "", None),
        ("bytes", "AAH/", "AAH/"),  # base64 text; the write path decodes and checks it
        ("float32[3]", "[0.25, -1.5, 3]", [0.25, -1.5, 3]),
        ("int64[2]", "[1,2]", [1, 2]),
        ("float32[3]", "", None),
    ],
)
def test_from_text_types_a_cell_by_its_dtype(dtype: str, text: str, value: Any) -> None:
    assert from_text(parse_dtype(dtype), text) == value


@pytest.mark.parametrize(
    ("dtype", "text", "reason"),
    [
        ("int64", "3.5", "expected an integer (int64), got '3.5'"),
        ("int64", "1_000", "expected an integer"),
        ("int64", "three", "expected an integer"),
        ("float64", "1_0", "expected a number (float64), got '1_0'"),
        ("float64", "abc", "expected a number"),
        ("bool", "maybe", "expected true or false, got 'maybe'"),
        ("float32[3]", "0.1;0.2", "expected a JSON array such as [0.5, 1.0] (float32[3])"),
    ],
)
def test_from_text_refuses_what_is_not_its_dtype(dtype: str, text: str, reason: str) -> None:
    with pytest.raises(CodecError, match=reason.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        from_text(parse_dtype(dtype), text)


def test_from_text_leaves_range_checks_to_the_write_path() -> None:
    # Parsed, not judged: the dtype's own check (the write path) refuses these with its usual message.
    assert math.isnan(from_text(parse_dtype("float64"), "nan"))
    assert from_text(parse_dtype("float32[3]"), "[1, 2]") == [1, 2]
    assert from_text(parse_dtype("int64"), "99999999999999999999") == 99999999999999999999


def test_csv_typing_names_the_column_of_a_bad_cell(names: Names) -> None:
    group = registry_for(names, "sqlite").groups["live"]
    header = ["consumer_id", "event_timestamp", *group.by_name]
    typing = CsvTyping(group, header)
    row = typing.row(["7", "", "3", "2.5", "true", "", "AAH/", "[1, 2, 3]", "[4, 5]"])
    assert row == {
        "consumer_id": 7,
        "event_timestamp": None,
        "orders_7d": 3,
        "avg_basket": 2.5,
        "active": True,
        "name": None,
        "raw": "AAH/",
        "embedding": [1, 2, 3],
        "ids": [4, 5],
    }
    with pytest.raises(ValidationFailed) as bad:
        typing.row(["7", "", "3", "2.5", "perhaps", "", "", "", ""])
    assert (bad.value.field, bad.value.detail) == ("active", "expected true or false, got 'perhaps'")
    with pytest.raises(ValidationFailed, match="has 2 cells; the header has 9"):
        typing.row(["7", ""])
    store_typing = CsvTyping(registry_for(names, "sqlite").groups["stores"], ["store_id", "open_orders"])
    assert store_typing.row(["0042", "1"]) == {"store_id": "0042", "open_orders": 1}  # string ids stay text


def test_detect_format_by_extension(tmp_path: Path) -> None:
    assert detect_format(Path("a.parquet")) == "parquet"
    assert detect_format(Path("dir.v2/a.CSV")) == "csv"
    assert detect_format(Path("a.csv.gz")) == "csv"
    assert detect_format(Path("a.ndjson")) == "jsonl"
    with pytest.raises(MaterializeError, match="pass --format"):
        detect_format(Path("a.txt"))


# -- files ---------------------------------------------------------------------------------------------


def registry_for(names: Names, kind: str) -> Registry:
    return parse_registry(names.registry(names.backend(kind)), "test-registry", env={})


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def live_row(consumer: int, *, at: datetime = T0, orders: int | None = None) -> dict[str, Any]:
    orders = consumer % 50 if orders is None else orders
    return {
        "consumer_id": consumer,
        "event_timestamp": stamp(at),
        "orders_7d": orders,
        "avg_basket": orders * 0.5,
        "active": consumer % 2 == 0,
        "name": None if consumer % 5 == 0 else f"consumer {consumer} ✓",
        "raw": base64.b64encode(bytes([consumer % 256, 0, 255])).decode(),
        "embedding": None if consumer % 7 == 0 else [0.25, -1.5, float(consumer % 9)],
        "ids": [consumer, -consumer],
    }


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return msgspec.json.encode(value).decode()
    return str(value)


def write_file(path: Path, rows: list[dict[str, Any]], *, row_group_size: int = 7) -> Path:
    """The same rows as CSV, JSON Lines or Parquet (by the extension), the way each format types them."""
    fmt = detect_format(path)
    if fmt == "jsonl":
        path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in rows))
    elif fmt == "csv":
        columns = list(rows[0])
        with open(path, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(columns)
            out.writerows([csv_cell(r.get(c)) for c in columns] for r in rows)
    else:
        table = pa.table(
            {
                "consumer_id": pa.array([r["consumer_id"] for r in rows], pa.int64()),
                "event_timestamp": pa.array(
                    [datetime.fromisoformat(r["event_timestamp"]) for r in rows], pa.timestamp("us", tz="UTC")
                ),
                "orders_7d": pa.array([r["orders_7d"] for r in rows], pa.int64()),
                "avg_basket": pa.array([r["avg_basket"] for r in rows], pa.float64()),
                "active": pa.array([r["active"] for r in rows], pa.bool_()),
                "name": pa.array([r["name"] for r in rows], pa.string()),
                "raw": pa.array([base64.b64decode(r["raw"]) for r in rows], pa.binary()),
                "embedding": pa.array([r["embedding"] for r in rows], pa.list_(pa.float32())),
                "ids": pa.array([r["ids"] for r in rows], pa.list_(pa.int64(), 2)),
            }
        )
        pq.write_table(table, path, row_group_size=row_group_size)
    return path


async def load(
    registry: Registry, path: Path, group: str = "live", *, batch_size: int = 10, retries: int = 0, **options: Any
) -> Report:
    opened = open_load(registry, group, path, limits=Limits(), batch_size=batch_size, **options)
    return await run_load(opened, retries=retries)


async def fetch_rows(client: Any, ids: list[int]) -> list[dict[str, Any]]:
    response = await client.post(
        "/v1/features/fetch",
        json={
            "entities": {"consumer_id": ids},
            "features": ["live:*"],
            "include_timestamps": True,
            "deadline_ms": 5000,
        },
    )
    assert response.status_code == 200, response.text
    assert not response.json()["degraded"]
    rows: list[dict[str, Any]] = response.json()["rows"]
    return rows


def served(row: dict[str, Any]) -> list[Any]:
    """A written row as the gateway serves it (live:* order; a null name is served as its default)."""
    name = "none" if row["name"] is None else row["name"]
    return [row["orders_7d"], row["avg_basket"], row["active"], name, row["raw"], row["embedding"], row["ids"]]


def statuses(row: dict[str, Any]) -> list[str]:
    """A stored null is no value: MISSING, served as the default."""
    return ["MISSING" if row[f] is None else "PRESENT" for f in FEATURES]


FEATURES = ["orders_7d", "avg_basket", "active", "name", "raw", "embedding", "ids"]


# -- loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_each_format_loads_every_value_typed(
    gateway: GatewayFactory, names: Names, kind: str, fmt: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [live_row(i, at=now) for i in range(1, 24)]
    path = write_file(tmp_path / f"live.{fmt}", rows)
    report = await load(registry_for(names, kind), path, batch_size=5)
    assert (report.rows, report.written, report.skipped_stale, report.rejected) == (23, 23, 0, 0)
    assert not default_checkpoint(path, "live").exists()  # a finished load leaves no checkpoint
    async with gateway(names.registry(names.backend(kind))) as client:
        answer = await fetch_rows(client, [r["consumer_id"] for r in rows])
    for row, got in zip(rows, answer, strict=True):
        assert got["values"] == served(row), row["consumer_id"]
        assert got["statuses"] == statuses(row)
        assert got["event_timestamps"][0] == row["event_timestamp"]


@pytest.mark.parametrize("kind", ["sqlite", "cockroach"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_bad_rows_are_reported_and_the_rest_of_their_batch_is_written(
    gateway: GatewayFactory, names: Names, kind: str, fmt: str, tmp_path: Path
) -> None:
    rows = [live_row(i) for i in range(1, 13)]
    if fmt == "parquet":  # Parquet is typed: the bad values are the ones its columns can hold
        rows[2]["embedding"] = [1.0, 2.0]  # wrong length
        rows[6]["avg_basket"] = float("inf")
        expected = [
            "row 3: embedding: expected 3 items (float32[3]), got 2",
            "row 7: avg_basket: NaN and infinity are not stored; send null for no value",
        ]
    else:
        rows[2]["embedding"] = [1.0, 2.0]
        rows[6]["orders_7d"] = "many"
        rows[8]["event_timestamp"] = "yesterday"
        line = 1 if fmt == "jsonl" else 2  # a CSV header is line 1, its first row line 2
        expected = [
            f"row 3 (line {2 + line}): embedding: expected 3 items (float32[3]), got 2",
            f"row 7 (line {6 + line}): orders_7d: "
            + (
                "expected an integer (int64), got 'many'"
                if fmt == "csv"
                else "expected an integer (int64), got a string"
            ),
            f"row 9 (line {8 + line}): event_timestamp: 'yesterday' is not an RFC 3339 timestamp "
            "(a date, a time with seconds and an offset, such as 2026-11-26T10:00:00Z or 2026-11-26T11:00:00.5+01:00)",
        ]
    path = write_file(tmp_path / f"live.{fmt}", rows)
    report = await load(registry_for(names, kind), path, batch_size=5)
    assert report.reasons == expected
    assert (report.rows, report.rejected, report.written) == (12, len(expected), 12 - len(expected))
    assert "rejected:" in report.lines()  # not "first 3 rejected": every reason is shown when there are this few
    async with gateway(names.registry(names.backend(kind))) as client:
        answer = await fetch_rows(client, [2, 3, 4])
    assert [r["statuses"][0] for r in answer] == ["PRESENT", "MISSING", "PRESENT"]  # its batch-mates are stored


async def test_a_jsonl_line_that_is_not_an_object_is_one_rejected_row(names: Names, tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    good = [msgspec.json.encode(live_row(i)).decode() for i in (1, 2)]
    path.write_text(f'{good[0]}\n\n[1, 2]\n{{not json\n{good[1]}\n{{"consumer_id": 3}}\n')
    report = await load(registry_for(names, "sqlite"), path)
    assert report.reasons[0] == "row 2 (line 3): (row): a line must be one JSON object"
    assert report.reasons[1].startswith("row 3 (line 4): (row): not valid JSON: JSON is malformed")
    assert report.reasons[2].startswith("row 5 (line 6): orders_7d: row lacks feature 'orders_7d'")
    assert (report.rows, report.written, report.rejected) == (5, 2, 3)


async def test_only_the_first_ten_reasons_are_kept_but_every_reject_is_counted(names: Names, tmp_path: Path) -> None:
    rows = [{**live_row(i), "orders_7d": "x"} if i % 2 else live_row(i) for i in range(1, 41)]
    report = await load(registry_for(names, "sqlite"), write_file(tmp_path / "live.jsonl", rows), batch_size=7)
    assert report.rejected == 20
    assert len(report.reasons) == 10
    assert report.reasons[0].startswith("row 1 (line 1): orders_7d:")
    assert report.reasons[9].startswith("row 19 (line 19): orders_7d:")
    assert "first 10 rejected:" in report.lines()


@pytest.mark.parametrize("kind", ["sqlite", "cockroach", "redis"])
async def test_stale_rows_are_counted_and_never_overwrite_newer_data(
    gateway: GatewayFactory, names: Names, kind: str, tmp_path: Path
) -> None:
    registry_yaml = names.registry(names.backend(kind))
    newer = live_row(5, at=T0 + timedelta(minutes=5), orders=99)
    async with gateway(registry_yaml) as client:
        response = await client.post("/v1/features/write", json={"group": "live", "rows": [newer]})
        assert response.json()["written"] == 1
    rows = [live_row(i) for i in range(1, 9)]  # 5 is older than what is stored
    rows.insert(3, live_row(7, at=T0 + timedelta(minutes=1), orders=70))  # 7 twice in one batch: the newer wins
    rows.append(live_row(2, at=T0 - timedelta(minutes=1), orders=20))  # 2 again in a later batch, older
    path = write_file(tmp_path / "live.csv", rows)
    report = await load(registry_for(names, kind), path, batch_size=5)
    assert (report.rows, report.written, report.skipped_stale, report.rejected) == (10, 7, 3, 0)
    async with gateway(registry_yaml) as client:
        answer = await fetch_rows(client, [5, 7, 2])
    assert [r["values"][0] for r in answer] == [99, 70, 2]


async def test_rows_without_event_time_get_the_loads_start_time(
    gateway: GatewayFactory, names: Names, tmp_path: Path
) -> None:
    rows = [{k: v for k, v in live_row(i).items() if k != "event_timestamp"} for i in (1, 2)]
    before = datetime.now(UTC)
    report = await load(registry_for(names, "sqlite"), write_file(tmp_path / "live.jsonl", rows))
    assert report.written == 2
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        answer = await fetch_rows(client, [1, 2])
    times = {r["event_timestamps"][0] for r in answer}
    assert len(times) == 1  # one time for the whole load, not one per batch or row
    assert datetime.fromisoformat(times.pop()) >= before.replace(microsecond=0)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (["consumer_id", "orders_7d"], "no column for 'avg_basket', 'active'"),
        (["consumer_id", "extra", "orders_7d"], "column 'extra' not in group live, which takes consumer_id"),
        (["orders_7d"], "no column 'consumer_id', the join key of group live"),
        (["consumer_id", "consumer_id"], "column 'consumer_id' appears twice"),
    ],
)
async def test_columns_that_do_not_fit_the_group_stop_before_anything_is_written(
    names: Names, tmp_path: Path, header: list[str], reason: str
) -> None:
    path = tmp_path / "live.csv"
    path.write_text(",".join(header) + "\n" + ",".join("1" for _ in header) + "\n")
    with pytest.raises(MaterializeError, match=reason):
        await load(registry_for(names, "sqlite"), path)
    assert not default_checkpoint(path, "live").exists()


async def test_parquet_columns_are_checked_too_and_a_pandas_index_is_ignored(names: Names, tmp_path: Path) -> None:
    path = tmp_path / "stores.parquet"
    pq.write_table(pa.table({"store_id": ["s-1"], "open_orders": [3], "__index_level_0__": [0]}), path)
    assert (await load(registry_for(names, "sqlite"), path, group="stores")).written == 1
    pq.write_table(pa.table({"store_id": ["s-1"], "open_orders": [3], "region": ["eu"]}), path)
    with pytest.raises(MaterializeError, match="column 'region' not in group stores"):
        await load(registry_for(names, "sqlite"), path, group="stores")
    path.write_bytes(b"not parquet")
    with pytest.raises(MaterializeError, match="not a readable Parquet file"):
        await load(registry_for(names, "sqlite"), path, group="stores")


async def test_a_file_unreadable_partway_stops_after_the_rows_before_it(names: Names, tmp_path: Path) -> None:
    path = write_file(tmp_path / "live.csv", [live_row(i) for i in range(1, 41)])
    lines = path.read_text().splitlines(keepends=True)
    lines[26] = lines[26].replace(",", ',"broken"quote,', 1)  # row 26: not CSV at all
    path.write_text("".join(lines))
    with pytest.raises(MaterializeError, match=r"line 27: not valid CSV.*stopped after row 20 \(stored\)"):
        await load(registry_for(names, "sqlite"), path, batch_size=10)
    assert msgspec.json.decode(default_checkpoint(path, "live").read_bytes())["rows_done"] == 20


async def test_gzipped_text_files_load(names: Names, tmp_path: Path) -> None:
    import gzip

    plain = write_file(tmp_path / "live.csv", [live_row(i) for i in range(1, 30)])
    path = tmp_path / "live.csv.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    report = await load(registry_for(names, "sqlite"), path)
    assert (report.rows, report.written) == (29, 29)


async def test_a_cut_gzipped_file_stops_with_a_message_not_a_traceback(names: Names, tmp_path: Path) -> None:
    import gzip

    plain = write_file(tmp_path / "live.csv", [live_row(i) for i in range(1, 2001)])
    compressed = gzip.compress(plain.read_bytes())
    path = tmp_path / "live.csv.gz"
    path.write_bytes(compressed[: len(compressed) // 2])  # a download or copy cut short
    with pytest.raises(MaterializeError, match=r"cannot read past line \d+"):
        await load(registry_for(names, "sqlite"), path, batch_size=100)


async def test_a_backend_that_does_not_answer_fails_the_load_clearly(names: Names, tmp_path: Path) -> None:
    from tests.support.servers import free_port

    registry = parse_registry(
        names.registry(names.backend("cockroach", dsn=f"postgresql://root@127.0.0.1:{free_port()}/test")),
        "r",
        env={},
    )
    with pytest.raises(BackendFailed, match="backend hot \\(cockroach\\) does not answer"):
        await load(registry, write_file(tmp_path / "live.jsonl", [live_row(1)]))


# -- resuming ------------------------------------------------------------------------------------------


async def refuse_key(names: Names, registry: Registry, kind: str, key: str) -> None:
    """Make the real backend fail any write of entity `key` (a trigger), so a load stops there."""
    backend = open_backend(registry.backends["hot"], registry)
    await backend.migrate()
    await backend.aclose()
    if kind == "sqlite":
        with sqlite3.connect(names.dir / "db.sqlite") as conn:
            conn.execute(
                f"CREATE TRIGGER refuse BEFORE INSERT ON feature_values WHEN NEW.entity_key = '{key}' "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
        return
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(
            f'CREATE FUNCTION "{names.schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN '
            f"IF NEW.entity_key = '{key}' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$"
        )
        await conn.execute(
            f'CREATE TRIGGER refuse BEFORE INSERT ON "{names.schema}".feature_values '
            f'FOR EACH ROW EXECUTE FUNCTION "{names.schema}".refuse()'
        )
    finally:
        await conn.close()


async def allow_all(names: Names, kind: str) -> None:
    if kind == "sqlite":
        with sqlite3.connect(names.dir / "db.sqlite") as conn:
            conn.execute("DROP TRIGGER refuse")
        return
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP TRIGGER refuse ON "{names.schema}".feature_values')
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["sqlite", "cockroach"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_failed_load_resumes_after_its_last_stored_batch(
    gateway: GatewayFactory, names: Names, kind: str, fmt: str, tmp_path: Path
) -> None:
    registry = registry_for(names, kind)
    rows = [live_row(i) for i in range(1, 51)]
    rows[4]["orders_7d"] = -1 if fmt == "parquet" else "bad"  # row 5: rejected in the first run (not parquet)
    rows.insert(10, live_row(3, at=T0 - timedelta(hours=1)))  # row 11: an older duplicate, stale
    path = write_file(tmp_path / f"live.{fmt}", rows, row_group_size=9)
    await refuse_key(names, registry, kind, "27")  # row 28, in the third batch of 12
    with pytest.raises(BackendFailed, match="injected failure"):
        await load(registry, path, batch_size=12)
    checkpoint = msgspec.json.decode(default_checkpoint(path, "live").read_bytes())
    assert checkpoint["rows_done"] == 24  # two batches stored, the third not
    bad = 0 if fmt == "parquet" else 1
    assert (checkpoint["written"], checkpoint["skipped_stale"], checkpoint["rejected"]) == (23 - bad, 1, bad)
    async with gateway(names.registry(names.backend(kind))) as client:
        statuses = [r["statuses"][0] for r in await fetch_rows(client, [22, 23, 24, 26])]
    assert statuses == ["PRESENT", "PRESENT", "MISSING", "MISSING"]  # rows 23, 24 stored; 25, 27 not

    await allow_all(names, kind)
    report = await load(registry, path, batch_size=12)
    assert report.resumed_from == 24
    assert (report.rows, report.written, report.skipped_stale, report.rejected) == (51, 50 - bad, 1, bad)
    assert report.rows_this_run == 27
    assert not default_checkpoint(path, "live").exists()
    async with gateway(names.registry(names.backend(kind))) as client:
        answer = await fetch_rows(client, list(range(1, 51)))
    expected = {r["consumer_id"]: r for r in rows if r["event_timestamp"] == stamp(T0)}
    for got in answer:
        consumer = got["entity"]["consumer_id"]
        if consumer == 5 and bad:
            assert got["statuses"][0] == "MISSING"
        else:
            assert got["values"] == served(expected[consumer]), consumer


@pytest.mark.parametrize("fmt", FORMATS)
async def test_replaying_stored_batches_after_a_crash_changes_nothing_and_totals_stay_exact(
    gateway: GatewayFactory, names: Names, fmt: str, tmp_path: Path
) -> None:
    """A crash after storing batches but before recording them: the rerun stores them again, harmlessly."""
    registry = registry_for(names, "cockroach")
    rows = [live_row(i) for i in range(1, 41)]
    for row in rows[::4]:
        del row["event_timestamp"]  # stamped with the load's start time, kept in the checkpoint
    if fmt == "parquet":
        for row in rows:
            row.setdefault("event_timestamp", None)
        path = tmp_path / "live.parquet"
        table = pa.Table.from_pylist([{**r, "raw": base64.b64decode(r["raw"])} for r in rows])
        pq.write_table(table, path, row_group_size=6)
    else:
        path = write_file(tmp_path / f"live.{fmt}", rows)
    await refuse_key(names, registry, "cockroach", "12")
    with pytest.raises(BackendFailed):
        await load(registry, path, batch_size=5)
    crashed = default_checkpoint(path, "live").read_bytes()  # as it was after batch 2
    await allow_all(names, "cockroach")
    complete = await load(registry, path, batch_size=5)
    async with gateway(names.registry(names.backend("cockroach"))) as client:
        before = await fetch_rows(client, list(range(1, 41)))

    default_checkpoint(path, "live").write_bytes(crashed)  # the crash: batches 3-8 stored, not recorded
    replayed = await load(registry, path, batch_size=5)
    assert replayed.resumed_from == 10
    assert (replayed.rows, replayed.written, replayed.skipped_stale, replayed.rejected) == (40, 40, 0, 0)
    assert (complete.written, complete.skipped_stale) == (40, 0)
    async with gateway(names.registry(names.backend("cockroach"))) as client:
        assert await fetch_rows(client, list(range(1, 41))) == before  # same values, same event times


async def test_a_checkpoint_for_another_file_is_refused_until_restart(names: Names, tmp_path: Path) -> None:
    registry = registry_for(names, "sqlite")
    path = write_file(tmp_path / "live.jsonl", [live_row(i) for i in range(1, 30)])
    await refuse_key(names, registry, "sqlite", "15")
    with pytest.raises(BackendFailed):
        await load(registry, path)
    await allow_all(names, "sqlite")
    write_file(path, [live_row(i) for i in range(1, 31)])  # the file changed since
    with pytest.raises(MaterializeError, match="is for another load .* or the file changed since; pass --restart"):
        await load(registry, path)
    other = parse_registry(names.registry(names.backend("sqlite", file="other")), "r", env={})
    with pytest.raises(MaterializeError, match="is for another load"):
        await load(other, path)  # same file, another database
    report = await load(registry, path, restart=True)
    assert (report.resumed_from, report.rows, report.written) == (0, 30, 30)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal_and_prints_lines_elsewhere() -> None:
    checkpoint = Checkpoint(
        file="f", size=1, digest="d", format="csv", group="g", backend={}, default_event_time="t",
        started_at="t", updated_at="t", rows_done=1500, written=1400, skipped_stale=60, rejected=40,
    )  # fmt: skip
    screen = Terminal()
    bar = Progress(screen, "f.csv -> g", interval_s=0)
    bar.update(checkpoint, 0.5)
    bar.update(checkpoint, 1.0, final=True)
    bar.close()
    frames = screen.getvalue().split("\r")[1:]
    assert len(frames) == 2
    assert frames[0].startswith("f.csv -> g: [############............]  50.0% 1,500 rows (1,400 written, 60 stale")
    assert frames[1].endswith("\x1b[K\n")  # the line is cleared as it is redrawn, and ended at the close
    log = io.StringIO()
    lines = Progress(log, "f.csv -> g", interval_s=3600)
    lines.update(checkpoint, None)  # within the interval: nothing
    lines.update(checkpoint, None, final=True)
    lines.close()
    assert log.getvalue().count("\n") == 1
    assert "%" not in log.getvalue()  # no bar when the size is unknown


# -- the command ---------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "app"]


def cli(*args: str, **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "materialize", *args], capture_output=True, text=True, timeout=120, **popen)


def test_the_command_reports_totals_and_reasons_and_exits_3_on_rejects(names: Names, tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(names.registry(names.backend("cockroach")))
    rows = [live_row(i) for i in range(1, 21)]
    rows[3]["active"] = "perhaps"
    path = write_file(tmp_path / "features.csv", rows)
    result = cli(str(path), "--group", "live", "--registry", str(registry), "--batch-size", "8")
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [
        f"{path} -> live: 20 rows: 19 written, 0 skipped as stale, 1 rejected",
        result.stdout.splitlines()[1],
        "rejected:",
        "  row 4 (line 5): active: expected true or false, got 'perhaps'",
    ]
    assert result.stdout.splitlines()[1].startswith("20 rows in ")
    assert "features.csv -> live: [########################] 100.0% 20 rows (19 written" in result.stderr

    rows[3]["active"] = True
    write_file(path, rows)
    again = cli(str(path), "--group", "live", "--registry", str(registry), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"{path} -> live: 20 rows: 20 written, 0 skipped as stale, 0 rejected")
    assert again.stderr == ""


def test_the_command_names_bad_arguments_and_exits_2(names: Names, tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(names.registry(names.backend("sqlite")))
    path = write_file(tmp_path / "rows.jsonl", [live_row(1)])
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_REGISTRY"}
    cases = [
        (["--group", "live"], "error: give --registry FILE (or set GATEWAY_REGISTRY)"),
        (["--group", "nope", "--registry", str(registry)], "error: unknown group 'nope'; groups: live, history"),
        (["--group", "live", "--registry", str(registry), "--batch-size", "0"], "at least 1"),
        (["--group", "live", "--registry", str(registry), "--format", "csv"], "line 1: not valid CSV"),
    ]
    for args, message in cases:
        result = cli(str(path), *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    unwritable = cli(str(path), "--group", "live", "--registry", str(registry), "--checkpoint", "/nonexistent/c.json")
    assert unwritable.returncode == 2
    assert "cannot write the checkpoint /nonexistent/c.json" in unwritable.stderr
    missing = cli(str(tmp_path / "none.csv"), "--group", "live", "--registry", str(registry))
    assert (missing.returncode, "cannot read" in missing.stderr) == (2, True)


def test_a_killed_command_resumes_where_it_stopped(gateway: Any, names: Names, tmp_path: Path) -> None:
    """SIGKILL at an arbitrary point (mid-batch, mid-checkpoint); the rerun finishes with exact totals."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(names.registry(names.backend("cockroach")))
    total = 10_000
    rows = [live_row(i) for i in range(1, total + 1)]
    path = write_file(tmp_path / "big.jsonl", rows)
    checkpoint = default_checkpoint(path, "live")
    args = [str(path), "--group", "live", "--registry", str(registry), "--batch-size", "20", "--no-progress"]
    proc = subprocess.Popen([*CLI, "materialize", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while done < 200 and time.monotonic() < deadline and proc.poll() is None:
            try:
                done = msgspec.json.decode(checkpoint.read_bytes())["rows_done"]
            except (FileNotFoundError, msgspec.DecodeError):
                pass
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the load finished before it could be killed"
    stopped_at = msgspec.json.decode(checkpoint.read_bytes())["rows_done"]
    assert 200 <= stopped_at < total

    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"resuming after row {stopped_at:,}" in result.stderr
    assert result.stdout.splitlines()[:2] == [
        f"{path} -> live: {total:,} rows: {total:,} written, 0 skipped as stale, 0 rejected",
        f"resumed after row {stopped_at:,}; totals include the earlier runs",
    ]
    assert not checkpoint.exists()

    async def check() -> None:
        async with gateway(names.registry(names.backend("cockroach"))) as client:
            for start in range(1, total + 1, 1000):
                answer = await fetch_rows(client, list(range(start, start + 1000)))
                for got in answer:
                    assert got["values"] == served(rows[got["entity"]["consumer_id"] - 1]), got

    asyncio.run(check())
