"""The cost report (GET /v1/cost, `feature-gateway cost`): bytes measured on real Redis, PostgreSQL and SQLite
against what is stored, the monthly cost, use since start, and facts worth acting on."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from app.auth import key_entry, new_token
from app.registry.load import parse_registry
from app.tiering.cost import GIB, CostPolicy, Measurement, Role, cost_report
from backends import open_backend
from backends.base import Footprint, Measured
from tests.support.clients import fetch, write
from tests.support.faults import closed_backend
from tests.support.gateways import GatewayFactory, GatewayProcess
from tests.support.registries import PG_DSN, REDIS_URL, Names
from tests.support.servers import free_port

HOT_PRICE = 8.0
BULK_PRICE = 0.25


def priced(backend: str, price: float) -> str:
    """A backend's YAML flow mapping (`Names.backend`) with a cost_per_gb_month."""
    return backend[:-1] + f", cost_per_gb_month: {price}}}"


def history_rows(first: int, count: int) -> list[dict[str, Any]]:
    return [
        {"consumer_id": i, "lifetime_orders": i % 97, "lifetime_value": i * 1.25} for i in range(first, first + count)
    ]


async def write_history(client: httpx.AsyncClient, count: int) -> None:
    for start in range(0, count, 500):
        await write(client, "history", history_rows(start + 1, min(500, count - start)))


async def cost(client: httpx.AsyncClient, **kwargs: Any) -> dict[str, Any]:
    response = await client.get("/v1/cost", **kwargs)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def redis_exact(names: Names, pattern: str) -> tuple[int, int, int]:
    """Keys under `pattern`, the sum of their MEMORY USAGE (every one), the sum of their string values' lengths."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
        usage = sum([await client.memory_usage(k, samples=0) or 0 for k in keys])
        blobs = sum([await client.strlen(k) for k in keys if await client.type(k) == b"string"])
    finally:
        await client.aclose()
    return len(keys), usage, blobs


@pytest.mark.parametrize("kind", ["redis", "cockroach", "sqlite"])
async def test_measured_bytes_against_the_stored_blobs(gateway: GatewayFactory, names: Names, kind: str) -> None:
    registry = names.registry(priced(names.backend(kind), HOT_PRICE))
    async with gateway(registry) as client:
        await write_history(client, 1000)
        report = await cost(client)
    held = report["groups"]["history"]["backends"]["bulk"]
    assert held["role"] == "record"
    assert held["keys"] == 1000
    assert report["groups"]["live"]["backends"]["hot"]["keys"] == 0
    size = held["bytes"]
    if kind == "redis":
        keys, usage, blobs = await redis_exact(names, f"{names.prefix}history:*")
        assert keys == 1000
        # 256 of 1,000 keys measured: the estimate is close to the sum over every key...
        assert held["sampled"] is True
        assert abs(size - usage) <= 0.05 * usage, (size, usage)
        # ...which is the blobs plus the key names and Redis' per-key allocations (tens of bytes a key)
        assert blobs < size < blobs + 1000 * 120
    elif kind == "cockroach":
        conn = await asyncpg.connect(PG_DSN)
        try:
            table = f'"{names.schema}".feature_values'
            blobs, keys = await conn.fetchrow(
                f"SELECT sum(length(payload)), sum(length(entity_key) + length(grp)) FROM {table}"
            )
        finally:
            await conn.close()
        assert held["sampled"] is False
        # Every column's stored size: the blob and key (each with a 1-byte header), event time and expiry (8 each)
        assert size == blobs + keys + 1000 * (3 + 8 + 8)
    else:
        conn = sqlite3.connect(names.dir / "db.sqlite")
        try:
            blobs, keys = conn.execute(
                "SELECT sum(length(payload)), sum(length(entity_key) + length(grp)) FROM feature_values"
            ).fetchone()
        finally:
            conn.close()
        assert size == blobs + keys + 1000 * 16
    # Monthly cost: GiB times the price of a GiB-month, on the backend and for the group
    assert held["gib"] == pytest.approx(size / GIB, abs=1e-6)
    assert held["monthly_cost"] == pytest.approx(size / GIB * HOT_PRICE, abs=1e-6)
    backend = report["backends"]["bulk"]  # `bulk` is another backend with the same options (Names.registry)
    assert backend["cost_per_gb_month"] == HOT_PRICE
    assert backend["keys"] == 1000
    assert backend["bytes"] == size
    assert backend["error"] is None
    assert report["backends"]["hot"]["keys"] == 0  # live and stores hold nothing
    assert report["monthly_cost"] == pytest.approx(size / GIB * HOT_PRICE, abs=1e-6)


async def test_small_redis_groups_are_measured_whole_and_aggregations_count_tiles_and_event_ids(
    gateway: GatewayFactory, names: Names
) -> None:
    registry = f"""
backends:
  hot: {names.backend("redis")}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
streams:
  orders:
    entity: consumer
    event_time: ts
    fields: {{order_value: float64}}
groups:
  history:
    entity: consumer
    backend: hot
    features:
      lifetime_orders: {{dtype: int64, default: 0}}
      lifetime_value: {{dtype: float64}}
  consumer_orders:
    entity: consumer
    backend: hot
    stream: orders
    allowed_lateness: 5m
    aggregations:
      order_count: {{function: count, windows: [1h], default: 0}}
"""
    now_ms = int(time.time() * 1000)
    events = [{"event_id": f"o-{i}", "consumer_id": i % 3, "ts": now_ms - i, "order_value": 1.5} for i in range(10)]
    async with gateway(registry) as client:
        await write_history(client, 100)
        response = await client.post("/v1/events/orders", json={"events": events})
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 10
        report = await cost(client)
    history = report["groups"]["history"]["backends"]["hot"]
    keys, usage, _ = await redis_exact(names, f"{names.prefix}history:*")
    assert (history["keys"], history["bytes"], history["sampled"]) == (100, usage, False)  # every key measured
    aggregates = report["groups"]["consumer_orders"]["backends"]["hot"]
    tiles, tile_bytes, _ = await redis_exact(names, f"{names.prefix}~tiles:consumer_orders:*")
    seen, seen_bytes, _ = await redis_exact(names, f"{names.prefix}~evt:consumer_orders:*")
    assert (tiles, seen) == (3, 10)  # a tile hash per consumer, a key per event id
    assert aggregates["keys"] == 13
    assert aggregates["bytes"] == tile_bytes + seen_bytes
    assert report["backends"]["hot"]["cost_per_gb_month"] is None
    assert aggregates["monthly_cost"] is None  # no price, no cost
    assert report["monthly_cost"] is None


async def test_redis_cluster_measures_every_master(gateway: GatewayFactory, names: Names, redis_cluster: Any) -> None:
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        await write_history(client, 300)
        report = await cost(client)
    held = report["groups"]["history"]["backends"]["bulk"]
    assert held["keys"] == 300
    cluster = redis.RedisCluster.from_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}")
    try:
        keys = [k async for k in cluster.scan_iter(match=f"{names.prefix}*", count=1000)]
        usage = sum([await cluster.memory_usage(k, samples=0) or 0 for k in keys])
        await cluster.delete(*keys)
    finally:
        await cluster.aclose()
    assert len(keys) == 300
    assert abs(held["bytes"] - usage) <= 0.05 * usage, (held["bytes"], usage)


async def test_use_since_start_default_rate_and_unused_features(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        await write_history(client, 10)
        # Counted as if the gateway had started an hour ago: requests per day are the hour's times 24
        client.app.state.gateway.metrics.started -= 3600  # type: ignore[attr-defined]
        for _ in range(3):  # 2 of 4 consumers stored: half the values are defaults
            await fetch(client, entities={"consumer_id": [1, 2, 11, 12]}, features=["history:lifetime_orders"])
        await fetch(client, entities={"consumer_id": [1]}, features=["history:*"])
        report = await cost(client)
    history = report["groups"]["history"]
    assert history["requests"] == 4  # lifetime_orders: the group's most requested feature
    assert history["requests_per_day"] == pytest.approx(4 / report["uptime_seconds"] * 86400, rel=0.01)
    assert history["requests_per_day"] == pytest.approx(96, rel=0.05)
    assert history["values"] == 3 * 4 + 2
    assert history["statuses"] == {"PRESENT": 6 + 2, "MISSING": 6, "EXPIRED": 0, "UNAVAILABLE": 0}
    assert history["default_rate"] == round(6 / 14, 4)
    assert history["never_requested"] == []
    live = report["groups"]["live"]
    assert live["never_requested"] == ["orders_7d", "avg_basket", "active", "name", "raw", "embedding", "ids"]
    assert (live["requests"], live["values"], live["default_rate"]) == (0, 0, None)
    assert any(
        r.startswith("live: no feature requested since") and "candidate to drop" in r for r in report["recommendations"]
    )
    assert any("uptime" in n or "extrapolated" in n for n in report["notes"])


async def test_a_cached_group_shows_both_backends(gateway: GatewayFactory, names: Names) -> None:
    registry = f"""
backends:
  hot: {priced(names.backend("redis"), HOT_PRICE)}
  bulk: {priced(names.backend("cockroach"), BULK_PRICE)}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  history:
    entity: consumer
    backend: bulk
    cache: {{backend: hot, ttl: 1h}}
    features:
      lifetime_orders: {{dtype: int64, default: 0}}
      lifetime_value: {{dtype: float64}}
"""
    async with gateway(registry) as client:
        await write_history(client, 1000)
        # Written through to the cache too; the LRU has since evicted all but 100 copies
        hot = redis.Redis.from_url(REDIS_URL)
        try:
            copies = [key async for key in hot.scan_iter(match=f"{names.prefix}history:*", count=1000)]
            assert len(copies) == 1000
            await hot.delete(*copies[100:])
        finally:
            await hot.aclose()
        report = await cost(client)
    held = report["groups"]["history"]["backends"]
    assert list(held) == ["bulk", "hot"]
    assert (held["bulk"]["role"], held["bulk"]["keys"]) == ("record", 1000)
    assert (held["hot"]["role"], held["hot"]["keys"]) == ("cache", 100)
    assert held["hot"]["monthly_cost"] == pytest.approx(held["hot"]["bytes"] / GIB * HOT_PRICE, abs=1e-6)
    assert held["bulk"]["monthly_cost"] == pytest.approx(held["bulk"]["bytes"] / GIB * BULK_PRICE, abs=1e-6)
    total = held["hot"]["monthly_cost"] + held["bulk"]["monthly_cost"]
    assert report["groups"]["history"]["monthly_cost"] == pytest.approx(total, abs=1e-6)
    cached = [r for r in report["recommendations"] if r.startswith("history: cached on hot (ttl 1h)")]
    assert len(cached) == 1, report["recommendations"]
    assert "100 keys" in cached[0]
    assert "1,000 keys" in cached[0]
    assert "10.0% of its keys" in cached[0]


async def test_a_large_rarely_read_group_on_the_dearest_backend_is_a_candidate_for_a_cheaper_one(
    gateway: GatewayFactory, names: Names
) -> None:
    registry = names.registry(priced(names.backend("redis"), HOT_PRICE), priced(names.backend("sqlite"), BULK_PRICE))
    async with gateway(registry) as client:
        # "Large" as the test's policy says: any byte (the default needs 256 MiB)
        client.app.state.costs.policy = CostPolicy(large_bytes=1)  # type: ignore[attr-defined]
        await write(client, "stores", [{"store_id": f"s-{i}", "open_orders": i} for i in range(50)])
        await write_history(client, 50)
        await fetch(client, entities={"store_id": ["s-1"]}, features=["stores:open_orders"])
        report = await cost(client)
    facts = report["recommendations"]
    stores = [r for r in facts if r.startswith("stores: ")]
    assert len(stores) == 1, facts
    assert " on hot (" in stores[0]
    assert "p99 need unknown: candidate for bulk + cache" in stores[0]
    # history already lives on the cheap backend; live is on hot too but holds nothing
    assert not any(r.startswith("history: ") and "candidate for" in r for r in facts)
    assert not any(r.startswith("live: ") and "candidate for" in r for r in facts)


async def test_a_backend_that_is_down_has_an_error_and_the_rest_answers(gateway: GatewayFactory, names: Names) -> None:
    registry = names.registry(names.backend("sqlite"), closed_backend("redis", names))
    async with gateway(registry) as client:
        await write(client, "stores", [{"store_id": "s-1", "open_orders": 1}])
        first = await cost(client)
        again = await cost(client)
    bulk = first["backends"]["bulk"]
    assert bulk["error"]
    assert (bulk["keys"], bulk["bytes"], bulk["monthly_cost"]) == (None, None, None)
    assert first["groups"]["history"]["backends"]["bulk"]["keys"] is None
    assert first["backends"]["hot"]["error"] is None
    assert first["groups"]["stores"]["backends"]["hot"]["keys"] == 1
    # Measurements are kept: the second report shows the same ones
    assert again["backends"]["hot"]["measured_at"] == first["backends"]["hot"]["measured_at"]


async def test_a_key_limited_to_some_groups_sees_only_them(gateway: GatewayFactory, names: Names) -> None:
    registry = names.registry(names.backend("sqlite"), names.backend("sqlite", file="bulk"))
    tokens = {"reader": new_token(), "live_reader": new_token()}
    config = json.dumps(
        [
            key_entry("reader", tokens["reader"], ["read", "write"]),
            key_entry("live_reader", tokens["live_reader"], ["read"], ["live"]),
        ]
    )
    async with gateway(registry, api_keys=config) as client:
        auth = {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}
        response = await client.post(
            "/v1/features/write", json={"group": "history", "rows": history_rows(1, 5)}, headers=auth["reader"]
        )
        assert response.status_code == 200, response.text
        assert (await client.get("/v1/cost")).status_code == 401
        full = await cost(client, headers=auth["reader"])
        limited = await cost(client, headers=auth["live_reader"])
    assert set(full["groups"]) == {"live", "history", "stores"}
    assert set(full["backends"]) == {"hot", "bulk"}
    assert set(limited["groups"]) == {"live"}
    assert set(limited["backends"]) == {"hot"}  # history's bulk is not its business
    assert not any("history" in r or "stores" in r for r in limited["recommendations"])


def test_the_cli_prints_a_table(tmp_path: Path, names: Names) -> None:
    registry = tmp_path / "registry.yaml"
    hot, bulk = priced(names.backend("redis"), HOT_PRICE), priced(names.backend("sqlite"), BULK_PRICE)
    registry.write_text(names.registry(hot, bulk))
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_METRICS_DIR", "GATEWAY_API_KEYS")}
    server = GatewayProcess(registry, tmp_path / "gateway.log", "--log-level", "warning", env=env)
    try:
        server.start()
        body = {"group": "history", "rows": history_rows(1, 20)}
        assert httpx.post(f"{server.url}/v1/features/write", json=body, timeout=10).status_code == 200
        fetched = {"entities": {"consumer_id": [1, 99]}, "features": ["history:lifetime_orders"]}
        assert httpx.post(f"{server.url}/v1/features/fetch", json=fetched, timeout=10).status_code == 200
        command = [sys.executable, "-m", "app", "cost", "--url", server.url]
        table = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
        raw = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60, env=env)
    finally:
        server.stop()
    nobody = f"http://127.0.0.1:{free_port()}"
    refused = subprocess.run([*command[:-1], nobody], capture_output=True, text=True, timeout=60, env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.startswith("group "))
    row = next(line for line in lines if line.startswith("history "))
    assert row.split()[1:4] == ["bulk", "record", "20"]
    # Columns aligned: text under its heading's start, numbers ending where their heading ends
    assert row[header.index("role") :].startswith("record")
    keys_end = header.index("keys") + len("keys")
    assert row[:keys_end].endswith(" 20")
    totals = next(line for line in lines if line.startswith("backend "))
    bulk_line = next(line for line in lines if line.startswith("bulk "))
    assert bulk_line[totals.index("type") :].startswith("sqlite")
    assert "0.25" in bulk_line
    assert any(line.startswith("monthly cost") for line in lines)
    assert "Recommendations" in table.stdout
    assert "live: no feature requested since" in table.stdout
    report = json.loads(raw.stdout)
    assert report["groups"]["history"]["backends"]["bulk"]["keys"] == 20
    assert report["groups"]["history"]["default_rate"] == 0.5
    assert refused.returncode == 1
    assert nobody in refused.stderr


async def test_a_redis_walk_cut_short_by_its_budget_estimates_the_keys(names: Names) -> None:
    registry = parse_registry(names.registry(names.backend("redis")), "test-registry", env={})
    client = redis.Redis.from_url(REDIS_URL)
    backend = open_backend(registry.backends["bulk"], registry)
    try:
        for start in range(0, 30_000, 10_000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, start + 10_000):
                pipe.set(f"{names.prefix}history:{i}", b"\x01" * 40)
            await pipe.execute()
        assert isinstance(backend, Measured)
        whole = (await backend.footprints([registry.groups["history"]], budget_s=30))["history"]
        # A budget already spent: one SCAN call (about 10,000 of the 30,000 keys), scaled by DBSIZE
        cut = (await backend.footprints([registry.groups["history"]], budget_s=0))["history"]
    finally:
        await backend.aclose()
        await client.aclose()
    assert (whole.keys, whole.keys_estimated, whole.sampled) == (30_000, False, True)
    assert cut.keys_estimated is True
    assert 15_000 <= cut.keys <= 60_000, cut
    assert cut.bytes == pytest.approx(whole.bytes / whole.keys * cut.keys, rel=0.1)


def test_a_group_being_moved_reports_both_backends_and_how_far_it_got(names: Names) -> None:
    """The report alone, from measurements as the meter keeps them."""
    registry = parse_registry(
        f"""
backends:
  hot: {priced(names.backend("redis"), HOT_PRICE)}
  bulk: {priced(names.backend("sqlite"), BULK_PRICE)}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  history:
    entity: consumer
    backend: hot
    moving_to: bulk
    features:
      lifetime_orders: {{dtype: int64, default: 0}}
""",
        "test-registry",
        env={},
    )
    now = time.time()
    measurements = {
        "hot": Measurement({"history": Footprint(1000, GIB, True)}, now),
        "bulk": Measurement({"history": Footprint(250, GIB // 4, False)}, now),
    }
    report = cost_report(registry, measurements, {}, started=now - 86_400, now=now)
    held = report.groups["history"].backends
    assert (held["hot"].role, held["bulk"].role) == (Role.RECORD, Role.MOVE_TARGET)
    assert held["hot"].monthly_cost == HOT_PRICE
    assert held["bulk"].monthly_cost == BULK_PRICE / 4
    assert report.monthly_cost == HOT_PRICE + BULK_PRICE / 4
    assert "history: moving from hot to bulk: 250 of 1,000 keys there so far" in report.recommendations
    # Moving already: not proposed again for a cheaper backend
    assert not any("candidate for" in r for r in report.recommendations)
    assert report.groups["history"].requests_per_day == 0
