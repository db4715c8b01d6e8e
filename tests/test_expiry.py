"""One expiry rule on every backend: PRESENT until event time + ttl, EXPIRED until + grace, then MISSING."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from app.registry.load import parse_registry
from app.serving.plan import EXPIRED, MISSING, PRESENT, GroupPlan
from tests.support.gateways import GatewayFactory
from tests.support.registries import PG_DSN, REDIS_URL, Names
from tests.support.servers import RedisClusterProcesses
from tests.support.waiting import eventually

KINDS = ("redis", "redis_cluster", "cockroach", "sqlite")
TTL = timedelta(hours=1)
GRACE = timedelta(hours=1)  # the default for a 1 h ttl: the ttl, capped at one day


def registry(names: Names, *, ttl: str = "1h", grace: str | None = None, cleanup: str = "10m") -> str:
    """One group per backend kind, identical features, `g_<kind>`."""
    backends = {
        "redis": names.backend("redis"),
        "redis_cluster": names.backend("redis_cluster"),
        "cockroach": names.backend("cockroach").replace("}", f", cleanup_interval: {cleanup}}}"),
        "sqlite": names.backend("sqlite").replace("}", f", cleanup_interval: {cleanup}}}"),
    }
    grace_line = f"\n    expired_grace: {grace}" if grace is not None else ""
    groups = "".join(
        f"""
  g_{kind}:
    entity: consumer
    backend: {kind}
    ttl: {ttl}{grace_line}
    features:
      n: {{dtype: int64, default: -1}}"""
        for kind in KINDS
    )
    lines = "".join(f"\n  {kind}: {spec}" for kind, spec in backends.items())
    return f"""
backends:{lines}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:{groups}
"""


def at(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def write_all(client: httpx.AsyncClient, rows: list[dict[str, Any]]) -> None:
    for kind in KINDS:
        response = await client.post("/v1/features/write", json={"group": f"g_{kind}", "rows": rows})
        assert response.status_code == 200, response.text


async def statuses_by_kind(client: httpx.AsyncClient, ids: list[int]) -> dict[str, list[str]]:
    """One fetch of every backend's group: all four read at the same moment."""
    response = await client.post(
        "/v1/features/fetch", json={"entities": {"consumer_id": ids}, "features": [f"g_{k}:n" for k in KINDS]}
    )
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    return {kind: [row["statuses"][i] for row in rows] for i, kind in enumerate(KINDS)}


async def test_every_backend_gives_the_same_status_on_each_side_of_ttl_and_reclaim(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    now = datetime.now(UTC)
    margin = timedelta(seconds=60)  # far more than a loaded box needs between the write and the read
    ages = {
        1: TTL - margin,  # PRESENT
        2: TTL + margin,  # EXPIRED
        3: TTL + GRACE - margin,  # EXPIRED, kept for its grace
        4: TTL + GRACE + margin,  # MISSING: past its reclaim time, written that way (Redis drops it at once)
    }
    async with gateway(registry(names)) as client:
        await write_all(
            client, [{"consumer_id": c, "event_timestamp": at(now - age), "n": c} for c, age in ages.items()]
        )
        seen = await statuses_by_kind(client, [1, 2, 3, 4, 5])
    expected = [PRESENT, EXPIRED, EXPIRED, MISSING, MISSING]
    assert seen == dict.fromkeys(KINDS, expected)


async def test_a_value_that_just_expired_is_expired_on_every_backend_not_missing(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    """Written "now" with no event time: once its ttl passes, Redis' key must still be there to say EXPIRED."""
    async with gateway(registry(names, ttl="1s", grace="1h")) as client:
        await write_all(client, [{"consumer_id": 1, "n": 1}])
        await asyncio.sleep(1.5)  # only a lower bound matters: the grace lasts an hour
        seen = await statuses_by_kind(client, [1])
        feast = await client.post(
            "/get-online-features",
            json={
                "features": [f"g_{k}:n" for k in KINDS],
                "entities": {"consumer_id": [1]},
                "full_feature_names": True,
            },
        )
    assert seen == dict.fromkeys(KINDS, [EXPIRED])
    assert [column["statuses"] for column in feast.json()["results"][1:]] == [["OUTSIDE_MAX_AGE"]] * 4


async def test_every_backend_keeps_a_row_until_the_read_path_calls_it_missing(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    """The stored reclaim time is the read path's boundary to the millisecond: never earlier (a backend would
    say MISSING while the others say EXPIRED), and not later than Redis' millisecond clock needs."""
    event = datetime.now(UTC).replace(microsecond=123456)
    reclaim = event + TTL + GRACE
    reclaim_ms = int(reclaim.timestamp() * 1000)
    async with gateway(registry(names)) as client:
        await write_all(client, [{"consumer_id": 7, "event_timestamp": at(event), "n": 7}])
        app_gateway = client.app.state.gateway  # type: ignore[attr-defined]
        cluster_key = app_gateway.backends["redis_cluster"].key(app_gateway.registry.groups["g_redis_cluster"], "7")
    single = redis.Redis.from_url(REDIS_URL)
    try:
        redis_ms = await single.execute_command("PEXPIRETIME", f"{names.prefix}g_redis:7")
    finally:
        await single.aclose()
    cluster_ms = redis_cluster.command(redis_cluster.owner(_slot(cluster_key)), "PEXPIRETIME", cluster_key)
    conn = await asyncpg.connect(PG_DSN)
    try:
        pg = await conn.fetchval(f'SELECT expires_at FROM "{names.schema}".feature_values WHERE entity_key = $1', "7")
    finally:
        await conn.close()
    import sqlite3

    with sqlite3.connect(names.dir / "db.sqlite") as lite:
        sqlite_us = lite.execute("SELECT expires_us FROM feature_values WHERE entity_key = '7'").fetchone()[0]
    assert redis_ms == cluster_ms == reclaim_ms  # a key lives through the millisecond holding the reclaim time
    assert pg == reclaim
    assert sqlite_us == int(reclaim.timestamp()) * 1_000_000 + reclaim.microsecond


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def test_the_read_path_boundaries_to_the_microsecond() -> None:
    registry_text = """
backends: {b: {type: sqlite, path: /tmp/never-opened.sqlite}}
entities: {consumer: {join_key: consumer_id}}
groups:
  g: {entity: consumer, backend: b, ttl: 10s, expired_grace: 5s, features: {n: {dtype: int64, default: 0}}}
"""
    group = parse_registry(registry_text).groups["g"]
    plan = GroupPlan.build(group, [0])
    event_us = 1_800_000_000_000_000
    blob = group.codec.encode(event_us, [4])
    nulls: dict[tuple[str, int], int] = {}
    status = {offset: plan.cell(blob, event_us + offset, nulls).statuses[0] for offset in (0, 10_000_000, 10_000_001)}
    status |= {offset: plan.cell(blob, event_us + offset, nulls).statuses[0] for offset in (15_000_000, 15_000_001)}
    assert status == {
        0: PRESENT,
        10_000_000: PRESENT,
        10_000_001: EXPIRED,
        15_000_000: EXPIRED,
        15_000_001: MISSING,
    }


@pytest.mark.parametrize("kind", ["cockroach", "sqlite"])
async def test_sql_backends_delete_reclaimable_rows_on_a_timer_without_writes(
    gateway: GatewayFactory, names: Names, kind: str
) -> None:
    now = datetime.now(UTC)
    text = names.registry(names.backend(kind).replace("}", ", cleanup_interval: 200ms}"))
    async with gateway(text) as client:
        rows = [
            {"consumer_id": 1, "lifetime_orders": 1, "lifetime_value": 1.0, "event_timestamp": at(now)},
            # history: ttl 30 d, grace 1 d by default
            {
                "consumer_id": 2,
                "lifetime_orders": 2,
                "lifetime_value": 2.0,
                "event_timestamp": at(now - timedelta(days=32)),
            },
        ]
        response = await client.post("/v1/features/write", json={"group": "history", "rows": rows})
        assert response.status_code == 200, response.text
        backend = client.app.state.gateway.backends["bulk"]  # type: ignore[attr-defined]

        async def stored() -> list[str]:
            if kind == "sqlite":
                return await backend._reader.run(  # type: ignore[no-any-return]
                    lambda conn: [k for (k,) in conn.execute("SELECT entity_key FROM feature_values ORDER BY 1")]
                )
            conn = await asyncpg.connect(PG_DSN)
            try:
                found = await conn.fetch(f'SELECT entity_key FROM "{names.schema}".feature_values ORDER BY 1')
            finally:
                await conn.close()
            return [r[0] for r in found]

        async def only_the_fresh_row_left() -> bool:
            return await stored() == ["1"]

        await eventually(only_the_fresh_row_left, within=10)
