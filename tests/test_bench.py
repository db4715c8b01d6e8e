"""The benchmark's own arithmetic (the smoke run in scripts/test exercises the rest on real services)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.registry.load import load_registry
from bench.data import FIRST_ID, generate, iter_values, zipf_ids, zipf_top_share
from bench.main import REGISTRY, local_cache_registry
from bench.measure import FloorResult, WrkResult, percentile
from bench.report import Report, Storage, compare, load_record, table, targets


def wrk_result(name: str, entities: int, connections: int, p50: float, rps: float, **extra: Any) -> WrkResult:
    fields: dict[str, Any] = {
        "workload": name,
        "entities": entities,
        "features": 100,
        "connections": connections,
        "workers": 1,
        "duration_s": 10.0,
        "requests": int(rps * 10),
        "rps": rps,
        "p50_ms": p50,
        "p90_ms": p50 * 2,
        "p99_ms": p50 * 3,
        "p99_9_ms": p50 * 4,
        "max_ms": p50 * 5,
        "mean_ms": p50,
        "non200": 0,
        "non200_by_status": {},
        "socket_errors": dict.fromkeys(("connect", "read", "write", "status", "timeout"), 0),
        "first_failure": None,
        "load_average": (1.0, 1.0),
        "gateway_cpu_ms_per_request": 0.5,
    }
    return WrkResult(**(fields | extra))


def floor_result(entities: int, p50: float) -> FloorResult:
    return FloorResult(entities, 10.0, 1000, p50, p50 * 2, p50 * 3, p50 * 4, (1.0, 1.0))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_summary_takes_medians_and_subtracts_the_floor() -> None:
    report = Report(meta={})
    for p50, rps in ((1.0, 900.0), (3.0, 300.0), (2.0, 500.0)):
        report.record(wrk_result("1 x 100, 1 conn, 1 worker", 1, 1, p50, rps))
        report.record(floor_result(1, p50 / 4))
    report.record(wrk_result("1 x 100, 32 conns, 1 worker", 1, 32, 20.0, 1500.0))
    report.storage.append(Storage("live", "Redis", 4_500_000, 500_000, 9.0))
    rows = report.summary()
    assert rows[0]["runs"] == 3
    assert rows[0]["p50_ms"] == 2.0
    assert rows[0]["rps"] == 500.0
    assert rows[0]["floor_p50_ms"] == 0.5
    assert rows[0]["overhead_p50_ms"] == 1.5
    assert "floor_p50_ms" not in rows[1]  # the floor is taken at one connection only
    assert rows[2] == {"measure": "storage: live on Redis (50 numeric)", "bytes_per_value": 9.0}
    assert report.problems == []
    text = table(rows)
    assert "| 1 x 100, 1 conn, 1 worker | 500 req/s | 2.000 | 6.000 | 0.500 | 1.500 | 1.500 | 0.500 |" in text
    assert "| storage: live on Redis (50 numeric) | 9.0 B/value |" in text


def test_failed_and_empty_runs_are_problems_and_marked_in_the_table() -> None:
    report = Report(meta={})
    errors = dict.fromkeys(("connect", "read", "write", "status", "timeout"), 0) | {"timeout": 2}
    report.record(wrk_result("a", 1, 1, 1.0, 100.0, non200=3, non200_by_status={"503": 3}, socket_errors=errors))
    report.record(wrk_result("b", 1, 1, 0.0, 0.0))
    report.record(FloorResult(1, 1.0, 0, 0.0, 0.0, 0.0, 0.0, (0.0, 0.0)))
    assert len(report.problems) == 3
    assert "5 of 1000 requests failed" in report.problems[0]
    assert "no request completed" in report.problems[1]
    assert "FAILED: 5 of 1,000 requests" in table(report.summary())


def test_compare_shows_each_shared_measure_with_its_ratio(tmp_path: Path) -> None:
    files = []
    for name, p50 in (("before", 2.0), ("after", 1.0)):
        report = Report(meta={})
        report.record(wrk_result("1 x 100, 1 conn, 1 worker", 1, 1, p50, 1 / p50 * 1000))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report.to_json(), default=str))
        files.append(path)
    text = compare(*files)
    assert "| 1 x 100, 1 conn, 1 worker | p50 ms | 2.000 | 1.000 | 0.50x |" in text
    assert "| 1 x 100, 1 conn, 1 worker | req/s | 500 | 1,000 | 2.00x |" in text


def test_generated_data_follows_the_registry_and_the_seed() -> None:
    registry = load_registry(REGISTRY, env={})
    live, embed = registry.groups["live"], registry.groups["embed"]
    rows = generate(live, 20, seed=1)
    assert rows == generate(live, 20, seed=1)
    assert rows != generate(live, 20, seed=2)
    assert len(rows) == 20
    assert all(len(r) == len(live.features) == 50 for r in rows)
    ints = [v for r in rows for f, v in zip(live.features, r, strict=True) if f.dtype.kind == "int64"]
    floats = [v for r in rows for f, v in zip(live.features, r, strict=True) if f.dtype.kind == "float64"]
    assert len(ints) == len(floats) == 20 * 25
    assert all(type(v) is int and 0 <= v <= 999 for v in ints)
    assert all(type(v) is float for v in floats)
    vectors = generate(embed, 3, seed=1)
    assert all(len(r) == 1 and len(r[0]) == 32 for r in vectors)


def test_tracing_rows_are_set_against_tracing_off_of_the_same_run() -> None:
    report = Report(meta={})
    base = "1 x 100, 1 conn, 1 worker, tracing"
    for off, full, tenth in ((1000.0, 800.0, 990.0), (1200.0, 1000.0, 1150.0), (900.0, 600.0, 880.0)):
        report.record(wrk_result(f"{base} off", 1, 1, 1.0, off))
        report.record(wrk_result(f"{base} 100%", 1, 1, 1.25, full, spans_per_request=3.0))
        report.record(wrk_result(f"{base} 1%", 1, 1, 1.0, tenth, spans_per_request=0.03))
    rows = {r["measure"]: r for r in report.summary()}
    assert rows[f"{base} 100%"]["rps_vs_tracing_off"] == 800.0 / 1000.0  # medians: 800 of 1000
    assert rows[f"{base} 100%"]["p50_ms_over_tracing_off"] == 0.25
    assert rows[f"{base} 100%"]["spans_per_request"] == 3.0
    assert rows[f"{base} 1%"]["rps_vs_tracing_off"] == 990.0 / 1000.0
    assert "rps_vs_tracing_off" not in rows[f"{base} off"]
    text = table(report.summary())
    assert f"| {base} 100% | 800 req/s (0.80x of off, p50 +0.250 ms) |" in text


def test_service_rows_are_set_against_their_base_rows() -> None:
    report = Report(meta={})
    base = "1 x 100, 1 conn, 1 worker"
    for cpu_list, cpu_service, cpu_on_demand in ((0.30, 0.31, 0.36), (0.32, 0.30, 0.34), (0.40, 0.42, 0.44)):
        report.record(wrk_result(f"{base}, by list", 1, 1, 0.35, 2000.0, gateway_cpu_ms_per_request=cpu_list))
        report.record(wrk_result(f"{base}, by service", 1, 1, 0.36, 1900.0, gateway_cpu_ms_per_request=cpu_service))
        report.record(
            wrk_result(
                f"{base}, by service + 2 on-demand", 1, 1, 0.40, 1800.0, gateway_cpu_ms_per_request=cpu_on_demand
            )
        )
    rows = {r["measure"]: r for r in report.summary()}
    assert rows[f"{base}, by service"]["cpu_vs_base"] == 0.31 / 0.32  # medians
    assert rows[f"{base}, by service"]["vs"] == "by list"
    assert round(rows[f"{base}, by service + 2 on-demand"]["p50_ms_over_base"], 3) == 0.04
    assert rows[f"{base}, by service + 2 on-demand"]["cpu_vs_base"] == 0.36 / 0.31
    assert "vs" not in rows[f"{base}, by list"]
    assert f"| {base}, by service | 1,900 req/s (p50 +0.010 ms, CPU 0.97x of by list) |" in table(report.summary())


def _record(path: Path, rows: list[dict[str, Any]], **meta: Any) -> Path:
    path.write_text(json.dumps({"meta": meta, "summary": rows}))
    return path


def test_compare_lists_rows_of_one_record_only_without_a_ratio_and_skips_missing_metrics(tmp_path: Path) -> None:
    # An old record (c26f67a's bench) has no msgpack, Zipf or service rows, and fewer keys per row
    old = _record(
        tmp_path / "old.json",
        [
            {"measure": "1 x 100, 1 conn, 1 worker", "rps": 1000.0, "p50_ms": 1.0, "gateway_cpu_ms_per_request": 0.6},
            {"measure": "gone", "rps": 5.0},
            {"measure": "storage: live on Redis (50 numeric)", "bytes_per_value": 7.9},
            {"no measure": True},
        ],
        commit="c26f67a",
    )
    new = _record(
        tmp_path / "new.json",
        [
            {
                "measure": "1 x 100, 1 conn, 1 worker",
                "rps": 2000.0,
                "p50_ms": 0.5,
                "gateway_cpu_ms_per_request": 0.3,
                "overhead_p50_ms": 0.1,
                "rps_vs_tracing_off": None,
            },
            {"measure": "100 x 100, 1 conn, 1 worker, msgpack", "rps": 300.0, "p50_ms": 2.0, "p50_vs_json": 0.4},
            {"measure": "storage: live on Redis (50 numeric)", "bytes_per_value": 7.9},
        ],
        commit="abc1234",
    )
    text = compare(old, new)
    assert "before: commit c26f67a" in text
    assert "after: commit abc1234" in text
    assert "| 1 x 100, 1 conn, 1 worker | gateway CPU ms/req | 0.600 | 0.300 | 0.50x |" in text
    assert "| 1 x 100, 1 conn, 1 worker | req/s | 1,000 | 2,000 | 2.00x |" in text
    assert "overhead p50 ms" not in text  # the old record lacks it
    assert "| storage: live on Redis (50 numeric) | B/value | 7.9 | 7.9 | 1.00x |" in text
    assert "Only in after (no ratio):\n- 100 x 100, 1 conn, 1 worker, msgpack (req/s 300, p50 ms 2.000)" in text
    assert "Only in before (no ratio):\n- gone (req/s 5)" in text
    assert "| 100 x 100, 1 conn, 1 worker, msgpack | p50" not in text


def test_compare_refuses_a_file_that_is_no_record(tmp_path: Path) -> None:
    good = _record(tmp_path / "good.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text('{"workloads": []}')
    with pytest.raises(ValueError, match="no `summary` list"):
        compare(bad, good)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable"):
        load_record(tmp_path / "broken.json")


def test_targets_against_a_stored_run() -> None:
    before = [
        {"measure": "1 x 100, 1 conn, 1 worker", "p50_ms": 0.7, "gateway_cpu_ms_per_request": 0.6},
        {"measure": "100 x 100, 1 conn, 1 worker", "p50_ms": 5.0, "gateway_cpu_ms_per_request": 4.0},
        {"measure": "1 x 100, 32 conns, 1 worker", "rps": 1000.0, "gateway_cpu_ms_per_request": 0.7},
    ]
    after = [
        {
            "measure": "1 x 100, 1 conn, 1 worker",
            "p50_ms": 0.3,
            "gateway_cpu_ms_per_request": 0.3,
            "overhead_p50_ms": 0.1,
        },
        {"measure": "100 x 100, 1 conn, 1 worker", "p50_ms": 4.5, "gateway_cpu_ms_per_request": 4.2},
        {
            "measure": "100 x 100, 1 conn, 1 worker, msgpack",
            "p50_ms": 2.0,
            "p50_vs_json": 0.44,
            "answered": "application/msgpack",
        },
        {"measure": "1 x 100, 32 conns, 1 worker", "rps": 2000.0, "gateway_cpu_ms_per_request": 0.5},
    ]
    lines = targets(before, after).splitlines()
    assert "| gateway CPU/req, 1 x 100, 1 conn, 1 worker, vs before | 0.50x | <= 0.6x | yes |" in lines
    assert "| req/s, 1 x 100, 32 conns, 1 worker, vs before | 2.00x | >= 1.6x | yes |" in lines
    assert "| p50, 100 x 100, 1 conn, 1 worker (JSON), vs before | 0.90x | <= 0.8x | NO |" in lines
    assert any(
        x.startswith("| p50, 100 x 100, 1 conn, 1 worker, msgpack / JSON") and "| 0.44x | <= 0.5x | yes |" in x
        for x in lines
    )
    assert "| overhead p50 over the floor, 1 x 100, 1 conn, 1 worker | 0.100 ms | <= 0.150 ms | yes |" in lines
    assert "| req/s, zipf, local cache / no local cache, same run | not measured | >= 2x |  |" in lines
    assert any(
        "worst gateway CPU/req of the 3 rows" in x
        and "(100 x 100, 1 conn, 1 worker) | 1.05x" in x
        and x.endswith("| NO |")
        for x in lines
    )


def test_msgpack_and_zipf_rows_are_set_against_their_base_rows() -> None:
    report = Report(meta={})
    json_row, packed = "100 x 100, 1 conn, 1 worker", "100 x 100, 1 conn, 1 worker, msgpack"
    report.record(wrk_result(json_row, 100, 1, 4.0, 250.0, gateway_cpu_ms_per_request=4.0))
    report.record(
        wrk_result(
            packed,
            100,
            1,
            2.0,
            500.0,
            gateway_cpu_ms_per_request=2.0,
            accept="application/msgpack",
            content_types={"application/msgpack": 5000},
        )
    )
    zipf = "zipf 1 x 100, 32 conns, 1 worker"
    report.record(wrk_result(f"{zipf}, no local cache", 1, 32, 20.0, 1000.0))
    report.record(wrk_result(f"{zipf}, local cache 1000 ms", 1, 32, 8.0, 2500.0))
    rows = {r["measure"]: r for r in report.summary()}
    assert rows[packed]["p50_vs_json"] == 0.5
    assert rows[packed]["cpu_vs_json"] == 0.5
    assert rows[packed]["answered"] == "application/msgpack"
    assert "p50_vs_json" not in rows[json_row]
    assert rows[f"{zipf}, local cache 1000 ms"]["rps_vs_no_local_cache"] == 2.5
    assert "rps_vs_no_local_cache" not in rows[f"{zipf}, no local cache"]
    text = table(report.summary())
    assert f"| {packed} | 500 req/s (p50 0.50x, CPU 0.50x of JSON) |" in text
    assert f"| {zipf}, local cache 1000 ms | 2,500 req/s (2.50x of no local cache) |" in text


def test_a_msgpack_row_answered_in_json_says_so() -> None:
    report = Report(meta={})
    report.record(wrk_result("1 x 100, 1 conn, 1 worker", 1, 1, 1.0, 1000.0))
    report.record(
        wrk_result(
            "1 x 100, 1 conn, 1 worker, msgpack",
            1,
            1,
            1.0,
            1000.0,
            accept="application/msgpack",
            content_types={"application/json": 9, "application/msgpack": 1},
        )
    )
    assert "(answered application/json) |" in table(report.summary())


def test_zipf_draws_follow_the_distribution() -> None:
    entities, s = 100_000, 1.1
    ids = zipf_ids(entities, s, 200_000, seed=1)
    assert ids == zipf_ids(entities, s, 200_000, seed=1)
    assert all(FIRST_ID <= i < FIRST_ID + entities for i in ids)
    counts = Counter(ids).most_common()
    expected = zipf_top_share(entities, s)
    assert 0.13 < expected < 0.14  # 1 / H(100000, 1.1)
    # The most drawn id's share: binomial, sd = sqrt(p(1-p)/n) = 0.00076; 5 sd of room
    assert abs(counts[0][1] / len(ids) - expected) < 0.004
    # rank 2 has 2^-1.1 of rank 1's weight
    assert abs(counts[1][1] / counts[0][1] - 2**-s) < 0.03
    # The hot ids are spread by the permutation, not 1, 2, 3; another stream draws the same hot ids
    assert [i for i, _ in counts[:3]] != [1, 2, 3]
    other = Counter(zipf_ids(entities, s, 200_000, seed=1, stream=1)).most_common(3)
    assert [i for i, _ in other] == [i for i, _ in counts[:3]]
    assert Counter(zipf_ids(entities, s, 20_000, seed=2)).most_common(1)[0][0] != counts[0][0]


def test_iter_values_extends_generate() -> None:
    registry = load_registry(REGISTRY, env={})
    live = registry.groups["live"]
    assert list(iter_values(live, 30, seed=1))[:20] == generate(live, 20, seed=1)


def test_local_cache_registry_adds_the_field_to_the_groups_named() -> None:
    text = local_cache_registry(REGISTRY.read_text(), ["live", "history"], 1000)
    document = yaml.safe_load(text)
    assert document["groups"]["live"]["local_cache_ms"] == 1000
    assert document["groups"]["history"]["local_cache_ms"] == 1000
    assert "local_cache_ms" not in document["groups"]["embed"]
    assert document["backends"] == yaml.safe_load(REGISTRY.read_text())["backends"]
