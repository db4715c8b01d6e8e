"""Redis Cluster specifics on a real 3-master cluster: key layout and spread, per-slot writes, redirects, faults.

The behaviour suite (tests/test_behaviour.py) also runs on the cluster through the `redis_cluster` kind.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot

from app.registry.load import parse_registry
from backends import open_backend
from backends.redis_cluster import BUCKETS, RedisClusterBackend, bucket_labels, bucket_of, cluster_client
from tests.support.clients import fetch, live_row, stamp, write
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names
from tests.support.servers import RedisClusterProcesses, free_port


def cluster_backend(names: Names) -> RedisClusterBackend:
    registry = parse_registry(names.registry(names.backend("redis_cluster")))
    backend = open_backend(registry.backends["hot"], registry)
    assert isinstance(backend, RedisClusterBackend)
    return backend


def keys_per_master(cluster: RedisClusterProcesses, prefix: str) -> dict[int, list[str]]:
    return {port: cluster.keys_on(port, f"{prefix}*") for port in cluster.ports}


def test_the_key_layout_is_pinned() -> None:
    # Stored keys are named by these: a change here orphans every key already stored on a cluster.
    assert BUCKETS == 16
    assert bucket_labels()[:6] == ("0063", "0041", "0001", "0023", "0062", "0040")
    assert [bucket_of(k) for k in ("101", "102", "s-1", "consumer ✓")] == [12, 6, 14, 5]


async def test_the_client_takes_every_seed_credentials_tls_and_the_gateway_timeouts(names: Names) -> None:
    registry = parse_registry(
        names.registry(
            '{type: redis, cluster: true, url: "rediss://gw:p%40ss@r1:7000,r2,[::1]:7002/0?ssl_cert_reqs=none",'
            " timeout_ms: 250, connect_timeout_ms: 400, pool_size: 5}"
        )
    )
    client = cluster_client(registry.backends["hot"])
    try:
        assert [(n.host, n.port) for n in client.startup_nodes] == [("r1", 7000), ("r2", 6379), ("::1", 7002)]
        kwargs = client.connection_kwargs
        assert (kwargs["username"], kwargs["password"]) == ("gw", "p@ss")
        assert kwargs["connection_class"] is SSLConnection
        assert kwargs["ssl_cert_reqs"] == "none"
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.4)
        assert kwargs["max_connections"] == 7
        assert client.retry.get_retries() == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize("buckets", [16, 32, 64])
def test_every_group_gets_one_bucket_in_each_slice_of_the_slot_range(buckets: int) -> None:
    labels = bucket_labels(buckets)
    rng = random.Random(3)
    for _ in range(300):
        group = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_0123456789") for _ in range(rng.randrange(1, 30)))
        slices = sorted(key_slot(f"{group}:{label}".encode()) * buckets // 16384 for label in labels)
        assert slices == list(range(buckets)), group


async def test_one_bucket_is_one_slot_and_a_group_spans_at_most_buckets_slots(
    names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    backend = cluster_backend(names)
    registry = parse_registry(names.registry(names.backend("redis_cluster")))
    live = registry.groups["live"]
    admin = SyncRedis(port=redis_cluster.ports[0], decode_responses=True)
    try:
        slots_of_bucket: dict[int, set[int]] = {}
        for i in range(400):
            key = backend.key(live, str(i))
            assert key.startswith(f"{names.prefix}{{live:")
            assert key.endswith(f"}}:{i}")
            slot = int(admin.execute_command("CLUSTER", "KEYSLOT", key))  # the server's word, not redis-py's
            slots_of_bucket.setdefault(bucket_of(str(i)), set()).add(slot)
    finally:
        admin.close()
        await backend.aclose()
    assert all(len(slots) == 1 for slots in slots_of_bucket.values())
    assert len(slots_of_bucket) == BUCKETS
    assert len({slot for slots in slots_of_bucket.values() for slot in slots}) == BUCKETS


async def test_keys_spread_over_every_master(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        for start in range(0, 900, 300):
            await write(client, "live", [live_row(i, i) for i in range(start, start + 300)])
        answer = await fetch(client, entities={"consumer_id": list(range(0, 900, 9))}, features=["live:orders_7d"])
    found = keys_per_master(redis_cluster, names.prefix)
    counts = {port: len(keys) for port, keys in found.items()}
    assert sum(counts.values()) == 900
    # Buckets fall evenly on fresh contiguous slot ranges: about a third each (16 buckets: 5 or 6 per master).
    assert all(count > 900 * 0.28 for count in counts.values()), counts
    assert [row["values"] for row in answer["rows"]] == [[i] for i in range(0, 900, 9)]


async def test_a_write_never_replaces_newer_data_in_any_slot(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    now = stamp()
    ids = list(range(200))
    assert len({bucket_of(str(i)) for i in ids}) == BUCKETS  # the batch spans every bucket, so every master
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        first = await write(client, "live", [live_row(i, 1, at=now) for i in ids])
        # Even ids older than stored (skipped), odd ids newer (written), and 20 new ones.
        second = await write(
            client,
            "live",
            [live_row(i, 2, at=stamp(timedelta(minutes=-5 if i % 2 == 0 else 1))) for i in ids]
            + [live_row(i, 3) for i in range(200, 220)],
        )
        answer = await fetch(client, entities={"consumer_id": list(range(220))}, features=["live:orders_7d"])
    assert first == {"group": "live", "written": 200, "skipped_stale": 0}
    assert second == {"group": "live", "written": 120, "skipped_stale": 100}
    assert [row["values"][0] for row in answer["rows"]] == [1 if i % 2 == 0 else 2 for i in ids] + [3] * 20


async def test_concurrent_writers_leave_the_newest_row_of_every_key(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    rng = random.Random(5)
    minutes = [[rng.randrange(50) for _ in range(60)] for _ in range(12)]  # per writer, per entity
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:

        async def writer(mine: list[int]) -> dict[str, Any]:
            rows = [live_row(i, m, at=stamp(timedelta(hours=-1, minutes=m))) for i, m in enumerate(mine)]
            return await write(client, "live", rows)

        results = await asyncio.gather(*(writer(mine) for mine in minutes))
        answer = await fetch(client, entities={"consumer_id": list(range(60))}, features=["live:orders_7d"])
    assert sum(r["written"] + r["skipped_stale"] for r in results) == 12 * 60
    newest = [max(w[i] for w in minutes) for i in range(60)]
    assert [row["values"][0] for row in answer["rows"]] == newest


async def test_writes_reload_the_script_after_the_cluster_forgot_it(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        await write(client, "live", [live_row(i, 1) for i in range(50)])
        for port in redis_cluster.ports:  # what a restarted node or a promoted replica looks like
            redis_cluster.info(port, "SCRIPT", "FLUSH")
        again = await write(client, "live", [live_row(i, 2) for i in range(50)])
        answer = await fetch(client, entities={"consumer_id": [0, 49]}, features=["live:orders_7d"])
    assert again["written"] == 50
    assert [row["values"] for row in answer["rows"]] == [[2], [2]]


async def test_a_cancelled_read_leaves_no_reply_behind(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        await write(client, "live", [live_row(i, i) for i in range(100)])
        await fetch(client, entities={"consumer_id": list(range(50))}, features=["live:orders_7d"])  # warm pools
        for port in redis_cluster.ports:  # 1 s: however late the fetch runs on a loaded box, it is inside the pause
            redis_cluster.info(port, "CLIENT", "PAUSE", "1000", "ALL")
        slow = await fetch(
            client, entities={"consumer_id": list(range(50))}, features=["live:orders_7d"], deadline_ms=50
        )
        for port in redis_cluster.ports:  # a PING answers once the pause is over (at a cron tick, up to 100 ms late)
            await asyncio.to_thread(redis_cluster.command, port, "PING")
        # Other ids than the cancelled read asked for: a connection still holding its reply would show here.
        after = await fetch(
            client, entities={"consumer_id": list(range(50, 100))}, features=["live:orders_7d"], deadline_ms=2000
        )
    assert slow["backends"]["hot"]["status"] == "timeout"
    assert {s for row in slow["rows"] for s in row["statuses"]} == {"UNAVAILABLE"}
    assert after["backends"]["hot"]["status"] == "ok"
    assert [row["values"] for row in after["rows"]] == [[i] for i in range(50, 100)]


async def test_a_slot_that_moved_is_followed(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    backend = cluster_backend(names)
    registry = parse_registry(names.registry(names.backend("redis_cluster")))
    slot = key_slot(backend.key(registry.groups["live"], "7").encode())
    await backend.aclose()
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        await write(client, "live", [live_row(i, i) for i in range(40)])  # the gateway knows the slot map now
        source = redis_cluster.owner(slot)
        target = next(port for port in redis_cluster.ports if port != source)
        redis_cluster.move_slot(slot, source, target)
        try:
            moved = await fetch(
                client, entities={"consumer_id": list(range(40))}, features=["live:orders_7d"], deadline_ms=2000
            )
            written = await write(client, "live", [live_row(7, 70)])
            again = await fetch(client, entities={"consumer_id": [7]}, features=["live:orders_7d"])
        finally:
            redis_cluster.move_slot(slot, target, source)
    assert moved["backends"]["hot"]["status"] == "ok", moved["backends"]
    assert [row["values"] for row in moved["rows"]] == [[i] for i in range(40)]
    assert written["written"] == 1
    assert again["rows"][0]["values"] == [70]


async def test_a_seed_list_whose_first_host_is_down(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    url = f"redis://127.0.0.1:{free_port()},127.0.0.1:{redis_cluster.ports[1]}"
    async with gateway(names.registry(names.backend("redis_cluster", url=url))) as client:
        await write(client, "live", [live_row(1, 4)])
        answer = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
        ready = await client.get("/readyz")
    assert answer["rows"][0]["values"] == [4]
    assert ready.status_code == 200


async def test_a_master_that_restarts_needs_no_gateway_restart(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    ids = list(range(60))
    async with gateway(names.registry(names.backend("redis_cluster"), names.backend("sqlite"))) as client:
        await write(client, "live", [live_row(i, 5) for i in ids])
        await write(client, "history", [{"consumer_id": 1, "lifetime_orders": 9, "lifetime_value": 1.0}])
        down_port = redis_cluster.ports[2]
        lost = {int(k.rsplit(":", 1)[1]) for k in keys_per_master(redis_cluster, names.prefix)[down_port]}
        assert 0 < len(lost) < len(ids)
        redis_cluster.stop_node(down_port)
        try:
            # Refused connections fail at once (one try, then one on a new connection), well inside this 1 s
            # deadline; a read still waiting when it passes would be cut off as "timeout".
            down = await fetch(
                client, entities={"consumer_id": ids}, features=["live:orders_7d", "history:*"], deadline_ms=1000
            )
            ready = await client.get("/readyz")
            usage = (await client.get("/v1/usage")).json()["groups"]["live"]["features"]["orders_7d"]["statuses"]
        finally:
            redis_cluster.start_node(down_port)  # same port and node id, no data: it kept nothing on disk
            redis_cluster.wait_ok()
        up = await fetch(client, entities={"consumer_id": ids}, features=["live:orders_7d"], deadline_ms=2000)
        await write(client, "live", [live_row(i, 6) for i in ids])
        again = await fetch(client, entities={"consumer_id": ids}, features=["live:orders_7d"])
    assert down["backends"]["hot"]["status"] == "error", "the down master was waited for until the deadline"
    assert down["backends"]["hot"]["error"].startswith(f"PartialRead: {len(lost)} of {len(ids)} keys unread")
    # Only the down master's keys are UNAVAILABLE; the other masters' are served, and so is the other backend.
    assert [row["statuses"][0] for row in down["rows"]] == ["UNAVAILABLE" if i in lost else "PRESENT" for i in ids]
    assert down["rows"][1]["statuses"][1:] == ["PRESENT", "PRESENT"]
    assert usage == {"PRESENT": len(ids) - len(lost), "MISSING": 0, "EXPIRED": 0, "UNAVAILABLE": len(lost)}
    assert ready.status_code == 503
    assert up["backends"]["hot"]["status"] == "ok", up["backends"]
    assert [row["statuses"][0] for row in up["rows"]] == ["MISSING" if i in lost else "PRESENT" for i in ids]
    assert Counter(row["values"][0] for row in again["rows"]) == {6: len(ids)}


def mget_stats(cluster: RedisClusterProcesses) -> tuple[int, int]:
    """MGET calls and calls the node turned away (MOVED, ASK, CLUSTERDOWN), summed over the masters."""
    calls = rejected = 0
    for port in cluster.ports:
        client = SyncRedis(port=port, decode_responses=True)
        try:
            stats = client.info("commandstats").get("cmdstat_mget", {})
        finally:
            client.close()
        calls += int(stats.get("calls", 0))
        rejected += int(stats.get("rejected_calls", 0))
    return calls, rejected


async def test_a_read_is_one_mget_per_bucket_sent_to_the_right_master(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    ids = list(range(100))
    async with gateway(names.registry(names.backend("redis_cluster"))) as client:
        await write(client, "live", [live_row(i, i) for i in ids])
        before = mget_stats(redis_cluster)
        answer = await fetch(client, entities={"consumer_id": ids}, features=["live:orders_7d"])
        after = mget_stats(redis_cluster)
    assert [row["values"] for row in answer["rows"]] == [[i] for i in ids]
    assert after[0] - before[0] == len({bucket_of(str(i)) for i in ids})
    assert after[1] - before[1] == 0  # no MOVED: each MGET went straight to the master owning its slot


async def test_more_concurrent_reads_than_connections_wait_their_turn(
    gateway: GatewayFactory, names: Names, redis_cluster: RedisClusterProcesses
) -> None:
    hot = names.backend("redis_cluster").replace("timeout_ms: 2000", "timeout_ms: 2000, pool_size: 2")
    async with gateway(names.registry(hot)) as client:
        await write(client, "live", [live_row(i, i) for i in range(100)])
        answers = await asyncio.gather(
            *(
                fetch(client, entities={"consumer_id": list(range(100))}, features=["live:orders_7d"], deadline_ms=3000)
                for _ in range(40)
            )
        )
    assert {a["backends"]["hot"]["status"] for a in answers} == {"ok"}
    assert all([row["values"] for row in a["rows"]] == [[i] for i in range(100)] for a in answers)
