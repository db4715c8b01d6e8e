"""A group's `local_cache_ms`: each worker serves hot keys from its memory for at most that long, reads of the
same keys in flight are shared, and a write through the gateway is seen at once by every worker (issue: the
per-worker cache). Real Redis and PostgreSQL; a second gateway (another process's memory) writes behind the
first one's back; two real workers for the invalidation between processes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from app.errors import RegistryError
from app.registry.load import parse_registry
from app.serving.local_cache import Stamps
from backends import open_backend
from tests.support.clients import fetch, parse_metrics, stamp, write
from tests.support.faults import keep_redis_busy
from tests.support.gateways import GatewayFactory, GatewayProcess, worker_pids
from tests.support.registries import REDIS_URL, Names
from tests.support.servers import TcpProxy
from tests.support.waiting import wait_until


def registry(names: Names, hot: str | None = None, *, live_ms: Any = 60000, extra: str = "") -> str:
    """`live` on Redis and `history` on PostgreSQL, both with a local cache; `quick` on Redis with a short one."""
    return f"""
backends:
  hot: {hot or names.backend("redis")}
  bulk: {names.backend("cockroach")}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    ttl: 1h
    local_cache_ms: {live_ms}
    features:
      orders: {{dtype: int64, default: -1}}
      basket: {{dtype: float64, default: 0.5}}
  history:
    entity: consumer
    backend: bulk
    ttl: 30d
    local_cache_ms: 60000
    features:
      lifetime: {{dtype: int64, default: -2}}
  quick:
    entity: consumer
    backend: hot
    local_cache_ms: 200ms
    features:
      orders: {{dtype: int64, default: -3}}
  plain:
    entity: consumer
    backend: hot
    features:
      orders: {{dtype: int64, default: -4}}
{extra}"""


def row(consumer: int, orders: int, at: str | None = None) -> dict[str, Any]:
    return {"consumer_id": consumer, "event_timestamp": at or stamp(), "orders": orders, "basket": orders / 2}


async def orders(client: httpx.AsyncClient, ids: list[int], group: str = "live", **body: Any) -> list[tuple[Any, str]]:
    answer = await fetch(client, entities={"consumer_id": ids}, features=[f"{group}:orders"], **body)
    return [(r["values"][0], r["statuses"][0]) for r in answer["rows"]]


async def lookups(client: httpx.AsyncClient, group: str = "live") -> dict[str, float]:
    samples = parse_metrics((await client.get("/metrics")).text)
    found = {"hit": 0.0, "miss": 0.0, "coalesced": 0.0}
    for (name, labels), value in samples.items():
        if name == "feature_gateway_local_cache_lookups_total" and ("group", group) in labels:
            found[dict(labels)["result"]] = value
    return found


async def gauges(client: httpx.AsyncClient) -> tuple[float, float]:
    samples = parse_metrics((await client.get("/metrics")).text)
    return (
        samples[("feature_gateway_local_cache_entries", frozenset())],
        samples[("feature_gateway_local_cache_bytes", frozenset())],
    )


# -- the registry ------------------------------------------------------------------------------------------


def test_local_cache_ms_is_milliseconds_or_a_duration(names: Names) -> None:
    groups = parse_registry(registry(names, live_ms='"2s"'), env={}).groups
    assert groups["live"].local_cache_ms == 2000
    assert groups["history"].local_cache_ms == 60000
    assert groups["quick"].local_cache_ms == 200
    assert groups["plain"].local_cache_ms is None
    assert parse_registry(registry(names, live_ms=12.5), env={}).groups["live"].local_cache_ms == 12.5


@pytest.mark.parametrize("value", ["0", "-5", "60001", "2m", "true", '"soon"', "[1]"])
def test_a_bad_local_cache_ms_names_its_path(names: Names, value: str) -> None:
    with pytest.raises(RegistryError, match=r"groups\.live\.local_cache_ms"):
        parse_registry(registry(names, live_ms=value), env={})


def test_the_bench_registry_takes_local_cache_ms_on_live_and_history() -> None:
    """What the bench's Zipf rows do to a copy of bench/registry.yaml."""
    path = Path(__file__).parent.parent / "bench" / "registry.yaml"
    text = path.read_text()
    for group in ("live", "history"):
        text = text.replace(f"\n  {group}:\n", f"\n  {group}:\n    local_cache_ms: 1000\n", 1)
    groups = parse_registry(text, str(path), env={}).groups  # (its transforms are imported from its folder)
    assert groups["live"].local_cache_ms == groups["history"].local_cache_ms == 1000
    assert groups["embed"].local_cache_ms is None


# -- served from memory, for at most local_cache_ms -----------------------------------------------------------


async def test_hits_are_served_within_the_window_and_read_again_after_it(gateway: GatewayFactory, names: Names) -> None:
    """Another gateway's write (another process's memory: it cannot tell this one) is served at most
    local_cache_ms late; a write through this gateway at once."""
    text = registry(names)
    async with gateway(text) as client, gateway(text) as other:
        await write(client, "live", [row(1, 10), row(2, 20)])
        await write(client, "quick", [{"consumer_id": 1, "orders": 10}])
        assert await orders(client, [1, 2]) == [(10, "PRESENT"), (20, "PRESENT")]  # read, and kept
        assert await orders(client, [1], "quick") == [(10, "PRESENT")]
        await write(other, "live", [row(1, 11)])
        await write(other, "quick", [{"consumer_id": 1, "orders": 11}])

        assert await orders(client, [1, 2]) == [(10, "PRESENT"), (20, "PRESENT")]  # 60 s: still the old one
        assert await lookups(client) == {"hit": 2, "miss": 2, "coalesced": 0}
        await asyncio.sleep(0.5)  # quick's 200 ms are over, whatever the box's load
        assert await orders(client, [1], "quick") == [(11, "PRESENT")]
        assert await lookups(client, "quick") == {"hit": 0, "miss": 2, "coalesced": 0}

        await write(client, "live", [row(2, 21)])  # through this gateway: seen at once
        assert await orders(client, [1, 2]) == [(10, "PRESENT"), (21, "PRESENT")]
        assert await lookups(client) == {"hit": 3, "miss": 3, "coalesced": 0}


async def test_postgres_and_redis_groups_are_cached_and_groups_without_it_are_not(
    gateway: GatewayFactory, names: Names
) -> None:
    async with gateway(registry(names)) as client:
        await write(client, "history", [{"consumer_id": 5, "lifetime": 50}])
        await write(client, "plain", [{"consumer_id": 5, "orders": 7}])
        await write(client, "live", [row(5, 3)])
        features = ["live:orders", "history:lifetime", "plain:orders"]
        for _ in range(3):
            answer = await fetch(client, entities={"consumer_id": [5, 6]}, features=features)
            assert [r["values"] for r in answer["rows"]] == [[3, 50, 7], [-1, -2, -4]]
            assert [r["statuses"] for r in answer["rows"]] == [["PRESENT"] * 3, ["MISSING"] * 3]
            assert answer["degraded"] is False
        assert await lookups(client, "history") == {"hit": 4, "miss": 2, "coalesced": 0}
        assert await lookups(client) == {"hit": 4, "miss": 2, "coalesced": 0}
        samples = parse_metrics((await client.get("/metrics")).text)
        assert not any(("group", "plain") in labels for name, labels in samples if "local_cache" in name)
        assert await gauges(client) == (4, pytest.approx(4 * 230, rel=0.5))


async def test_a_fetch_served_from_memory_is_no_read_in_the_backends_metrics(
    gateway: GatewayFactory, names: Names
) -> None:
    async with gateway(registry(names)) as client:
        await write(client, "history", [{"consumer_id": 5, "lifetime": 50}])
        for _ in range(3):  # read from PostgreSQL once, then held
            answer = await fetch(client, entities={"consumer_id": [5]}, features=["history:lifetime"])
            assert answer["rows"][0]["values"] == [50]
            assert answer["backends"]["bulk"]["status"] == "ok"
        merged = client.app.state.gateway.metrics.merged()  # type: ignore[attr-defined]
    assert merged.backend_outcomes[("bulk", "ok")] == 1
    assert sum(merged.backend_latency["bulk"].counts) == 1  # no 0 ms "reads" for the two served from memory


async def test_server_timing_tells_the_keys_held_from_those_read(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(registry(names)) as client:
        await write(client, "history", [{"consumer_id": 5, "lifetime": 50}])
        timings = []
        for ids in ([5, 6], [5, 6], [5, 7]):  # read both; both held; one held and one read
            answer = await client.post(
                "/v1/features/fetch",
                json={"entities": {"consumer_id": ids}, "features": ["history:lifetime", "plain:orders"]},
            )
            timings.append([p.strip() for p in answer.headers["server-timing"].split(",") if ".local" in p])
    assert timings == [
        ['bulk.local;desc="0 hit 2 miss"'],  # (plain, on hot, has no local_cache_ms: no hot.local)
        ['bulk.local;desc="2 hit 0 miss"'],
        ['bulk.local;desc="1 hit 1 miss"'],
    ]


async def test_statuses_are_judged_at_each_request(gateway: GatewayFactory, names: Names) -> None:
    """A cached value whose ttl ends inside the window reads EXPIRED; a key the store lacks is cached as missing,
    until a write through the gateway."""
    async with gateway(registry(names)) as client:
        soon = stamp(timedelta(hours=-1, seconds=3))  # its 1 h ttl ends in 3 s
        await write(client, "live", [row(1, 10, at=soon)])
        assert await orders(client, [1, 2]) == [(10, "PRESENT"), (-1, "MISSING")]
        await asyncio.sleep(3.5)
        assert await orders(client, [1, 2]) == [(-1, "EXPIRED"), (-1, "MISSING")]
        assert await lookups(client) == {"hit": 2, "miss": 2, "coalesced": 0}  # both served from memory
        await write(client, "live", [row(2, 20)])
        assert await orders(client, [1, 2]) == [(-1, "EXPIRED"), (20, "PRESENT")]


async def test_entries_and_bytes_are_bounded(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(registry(names), local_cache_entries=3) as client:
        await write(client, "live", [row(i, i) for i in range(1, 6)])
        assert await orders(client, [1, 2, 3, 4, 5]) == [(i, "PRESENT") for i in range(1, 6)]
        entries, _ = await gauges(client)
        assert entries == 3
        assert await orders(client, [4, 5]) == [(4, "PRESENT"), (5, "PRESENT")]  # the last filled are kept
        assert (await lookups(client))["hit"] == 2
        assert await orders(client, [1]) == [(1, "PRESENT")]  # the first were evicted
        assert (await lookups(client))["miss"] == 6
    async with gateway(registry(names), local_cache_bytes=1000) as client:
        assert await orders(client, list(range(1, 6))) == [(i, "PRESENT") for i in range(1, 6)]
        entries, held = await gauges(client)
        assert 0 < entries < 5
        assert held <= 1000


# -- single flight -------------------------------------------------------------------------------------------


@asynccontextmanager
async def admin() -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def test_identical_concurrent_reads_are_one_backend_read(gateway: GatewayFactory, names: Names) -> None:
    """Redis kept busy 400 ms: the first fetch's read waits, the other 19 wait for it rather than read again."""
    async with gateway(registry(names)) as client, admin() as redis_admin:
        await write(client, "live", [row(i, i) for i in (1, 2, 3)])
        busy = asyncio.ensure_future(keep_redis_busy(redis_admin, 400_000))
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(orders(client, [1, 2, 3]) for _ in range(20)))
        await busy
        assert answers == [[(1, "PRESENT"), (2, "PRESENT"), (3, "PRESENT")]] * 20
        counts = await lookups(client)
        assert counts["miss"] == 3  # one read of the 3 keys; the other fetches waited for it (or came after it)
        assert counts["hit"] + counts["coalesced"] == 57


async def test_a_waiter_whose_leader_gave_up_reads_itself(gateway: GatewayFactory, names: Names) -> None:
    """The first fetch's deadline cuts its read off: the fetch that waited for it reads the keys itself, within
    its own deadline, and serves them."""
    async with gateway(registry(names)) as client, admin() as redis_admin:
        await write(client, "live", [row(1, 10)])
        busy = asyncio.ensure_future(keep_redis_busy(redis_admin, 1_000_000))
        await asyncio.sleep(0.05)
        leader = asyncio.ensure_future(
            fetch(client, entities={"consumer_id": [1]}, features=["live:orders"], deadline_ms=300)
        )
        await asyncio.sleep(0.1)  # the leader is reading (Redis answers no one for 1 s)
        waiter = await orders(client, [1], deadline_ms=5000)
        cut = await leader
        await busy
        assert cut["rows"][0]["statuses"] == ["UNAVAILABLE"]
        assert cut["degraded"] is True
        assert waiter == [(10, "PRESENT")]
        assert await lookups(client) == {"hit": 0, "miss": 1, "coalesced": 1}


# -- the backend down: hits served, its circuit as without the cache --------------------------------------------


async def test_a_backend_down_serves_hits_and_all_hit_fetches_tell_its_circuit_nothing(
    gateway: GatewayFactory, names: Names
) -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    hot = names.backend("redis", url=f"redis://127.0.0.1:{proxy.port}/0")
    try:
        async with gateway(registry(names, hot), breaker_failures=5, breaker_reset_ms=60_000) as client:
            await write(client, "live", [row(1, 10), row(2, 20)])
            assert await orders(client, [1, 2]) == [(10, "PRESENT"), (20, "PRESENT")]
            await proxy.stop()

            answer = await fetch(client, entities={"consumer_id": [1, 2, 3]}, features=["live:orders"])
            assert [(r["values"][0], r["statuses"][0]) for r in answer["rows"]] == [
                (10, "PRESENT"), (20, "PRESENT"), (-1, "UNAVAILABLE")
            ]  # fmt: skip
            assert answer["degraded"] is True
            for _ in range(3):  # 4 failures: one more opens the circuit
                assert await orders(client, [3]) == [(-1, "UNAVAILABLE")]
            for _ in range(10):  # served from memory: neither a success nor a failure of the backend
                answer = await fetch(client, entities={"consumer_id": [2, 1]}, features=["live:orders"])
                assert answer["degraded"] is False
                assert [r["values"][0] for r in answer["rows"]] == [20, 10]
            assert await orders(client, [3]) == [(-1, "UNAVAILABLE")]
            samples = parse_metrics((await client.get("/metrics")).text)
            state = frozenset({("backend", "hot"), ("direction", "read"), ("state", "open")})
            assert samples[("feature_gateway_backend_circuit_state", state)] == 1

            answer = await fetch(client, entities={"consumer_id": [1, 3]}, features=["live:orders"])  # circuit open
            assert [(r["values"][0], r["statuses"][0]) for r in answer["rows"]] == [
                (10, "PRESENT"),
                (-1, "UNAVAILABLE"),
            ]
            answer = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders", "plain:orders"])
            assert answer["rows"][0]["statuses"] == ["PRESENT", "UNAVAILABLE"]
            samples = parse_metrics((await client.get("/metrics")).text)
            opened = frozenset({("backend", "hot"), ("outcome", "open")})
            assert samples[("feature_gateway_backend_reads_total", opened)] >= 2
    finally:
        await proxy.stop()


# -- every worker of the gateway ----------------------------------------------------------------------------


@pytest.mark.timeout(180)  # two workers start, then a second of snapshots per write: 20 s here, more when loaded
def test_a_write_through_one_worker_is_seen_at_once_by_the_other(names: Names, tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(names))
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = {**os.environ, "GATEWAY_METRICS_DIR": str(shared)}
    server = GatewayProcess(path, tmp_path / "gateway.log", "--workers", "2", "--log-level", "warning", env=env)
    server.start(ready_within=60)
    try:
        assert server.proc is not None
        wait_until(lambda: len(worker_pids(server.proc.pid)) == 2, within=30, what="two workers")  # type: ignore[union-attr]
        workers = worker_pids(server.proc.pid)
        body = {"entities": {"consumer_id": [1]}, "features": ["live:orders"]}

        def fetch_new_connection() -> Any:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                answer = client.post("/v1/features/fetch", json=body)
                assert answer.status_code == 200, answer.text
                return answer.json()["rows"][0]["values"][0]

        def per_worker(result: str) -> dict[int, float]:
            counts = {}
            for pid in workers:
                snapshot = shared / f"{pid}.json"
                if snapshot.exists():
                    found = json.loads(snapshot.read_bytes())
                    counts[pid] = sum(n for g, r, n in found.get("local_cache", []) if g == "live" and r == result)
            return counts

        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/v1/features/write", json={"group": "live", "rows": [row(1, 1)]}).status_code == 200

        def both_hold_it() -> bool:  # each worker has served it from memory: it holds it
            fetch_new_connection()
            hits = per_worker("hit")
            return len(hits) == 2 and all(n > 0 for n in hits.values())

        wait_until(both_hold_it, within=60, interval=0.1, what="both workers serving from memory")
        for value in range(2, 5):  # each write lands on either worker
            time.sleep(1.2)  # each worker's snapshot has its counts so far (rewritten every second)
            before = per_worker("miss")
            with httpx.Client(base_url=server.url, timeout=30) as client:
                answer = client.post("/v1/features/write", json={"group": "live", "rows": [row(1, value)]})
                assert answer.status_code == 200, answer.text
            answers: list[Any] = []

            def both_read_it_again(before: dict[int, float] = before, answers: list[Any] = answers) -> bool:
                answers.append(fetch_new_connection())
                after = per_worker("miss")
                return all(after[pid] > before[pid] for pid in workers)  # each served a read since the write

            wait_until(both_read_it_again, within=60, interval=0.02, what="both workers serving after the write")
            assert answers == [value] * len(answers)  # every read after the write returned sees it, on either
    finally:
        server.stop()


# -- with the cache tier, and a reload ----------------------------------------------------------------------


async def test_in_front_of_a_cache_tier_and_emptied_by_a_reload(gateway: GatewayFactory, names: Names) -> None:
    """A group with a cache tier may have a local cache too: memory first, then the Redis copy, then PostgreSQL;
    a write through the gateway updates the tier before the workers drop their copies."""
    extra = """
  tiered:
    entity: consumer
    backend: bulk
    cache: {backend: hot, ttl: 1h}
    local_cache_ms: 60000
    features:
      orders: {dtype: int64, default: -5}
"""
    text = registry(names, extra=extra)
    async with gateway(text) as client, gateway(text) as other:
        await write(client, "tiered", [{"consumer_id": 1, "orders": 1}])
        for _ in range(3):
            assert await orders(client, [1, 2], "tiered") == [(1, "PRESENT"), (-5, "MISSING")]
        assert await lookups(client, "tiered") == {"hit": 4, "miss": 2, "coalesced": 0}
        await write(other, "tiered", [{"consumer_id": 1, "orders": 2}])  # another gateway: held up to 60 s
        assert await orders(client, [1], "tiered") == [(1, "PRESENT")]
        await write(client, "tiered", [{"consumer_id": 1, "orders": 3}])
        assert await orders(client, [1], "tiered") == [(3, "PRESENT")]

        await write(other, "live", [row(1, 10)])
        assert await orders(client, [1]) == [(10, "PRESENT")]
        await write(other, "live", [row(1, 11)])
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        await gw.reload(parse_registry(text, env={}), open_backend)
        assert await orders(client, [1]) == [(11, "PRESENT")]  # what it held was dropped with the old registry


def test_stamps_are_shared_through_their_folder_and_never_repeat(tmp_path: Path) -> None:
    first, second = Stamps(str(tmp_path)), Stamps(str(tmp_path))  # two workers' mappings of one file
    slot = first.slot("live", "42")
    assert slot == second.slot("live", "42")  # crc32: the same in every process, whatever PYTHONHASHSEED
    seen = second.view[slot]
    first.bump("live", ["42"])
    bumped = second.view[slot]
    assert bumped != seen
    first.view[slot] = bumped + 10**15  # a stamp ahead of the clock (another writer's): the next still differs
    second.bump("live", ["42"])
    assert first.view[slot] == bumped + 10**15 + 1
    first.close()
    second.close()


def test_a_folder_it_cannot_write_leaves_each_worker_its_own_stamps(tmp_path: Path) -> None:
    stamps = Stamps(str(tmp_path / "missing"))
    stamps.bump("live", ["1"])
    assert stamps.view[stamps.slot("live", "1")] > 0
    stamps.close()
