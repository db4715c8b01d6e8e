"""The gateway's circuit breakers on real servers: what opens a read circuit and what does not, what an open
circuit costs, and how a probe closes it. (The breaker's own state machine: test_breaker.py.)"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as redis

from tests.support.clients import fetch, live_row, write
from tests.support.clock import ManualClock
from tests.support.gateways import GatewayFactory
from tests.support.registries import REDIS_URL, Names
from tests.support.servers import RedisProcess, TcpProxy, running
from tests.support.waiting import eventually

FEATURES = ["live:orders_7d", "history:lifetime_orders"]


async def test_circuit_opens_after_failures_and_a_probe_closes_it(gateway: GatewayFactory, names: Names) -> None:
    proxy = TcpProxy(target_port=5432)
    bulk = names.backend("cockroach", dsn=f"postgresql://root@127.0.0.1:{proxy.port}/test")
    request = {"entities": {"consumer_id": [1]}, "features": FEATURES}
    async with gateway(
        names.registry(names.backend("sqlite"), bulk), breaker_failures=3, breaker_reset_ms=1500, migrate_retry_s=0.05
    ) as client:
        circuits = client.app.state.gateway.breakers["bulk"]  # type: ignore[attr-defined]
        assert all(breaker.clock is time.monotonic for breaker in circuits)  # the gateway's own clock, which
        clock = ManualClock()  # this test swaps for one it moves by hand: no request here can race breaker_reset_ms
        for breaker in circuits:
            breaker.clock = clock
        answers = [(await client.post("/v1/features/fetch", json=request)).json() for _ in range(5)]
        ready = (await client.get("/readyz")).json()
        write_open = await client.post(
            "/v1/features/write",
            json={"group": "history", "rows": [{"consumer_id": 1, "lifetime_orders": 1, "lifetime_value": 1.0}]},
        )
        async with running(proxy):
            await eventually(lambda: _migrated(client, "bulk"))
            still_open = (await client.post("/v1/features/fetch", json=request)).json()
            clock.advance(1.25)
            not_yet = (await client.post("/v1/features/fetch", json=request)).json()
            clock.advance(0.25)  # breaker_reset_ms since the circuit opened: the next request probes
            probe = (await client.post("/v1/features/fetch", json=request)).json()
            after = (await client.post("/v1/features/fetch", json=request)).json()
            ready_after = (await client.get("/readyz")).json()
    assert [a["backends"]["bulk"]["status"] for a in answers] == ["error", "error", "error", "open", "open"]
    assert answers[4]["backends"]["bulk"]["ms"] == 0  # an open circuit costs nothing
    assert answers[4]["rows"][0]["statuses"] == ["MISSING", "UNAVAILABLE"]
    assert ready["circuits"]["bulk"] == "open"
    assert write_open.status_code == 503  # tried, and refused: reads and writes have a circuit each
    assert "did not confirm the write" in write_open.json()["detail"]
    assert still_open["backends"]["bulk"]["status"] == "open"
    assert not_yet["backends"]["bulk"]["status"] == "open"
    assert probe["backends"]["bulk"]["status"] == "ok"
    assert after["backends"]["bulk"]["status"] == "ok"
    assert after["rows"][0]["statuses"] == ["MISSING", "MISSING"]
    assert ready_after["circuits"]["bulk"] == "closed"


async def test_a_frozen_backend_is_skipped_after_repeated_slow_misses(gateway: GatewayFactory, names: Names) -> None:
    server = RedisProcess()
    server.start()
    request = {
        "entities": {"consumer_id": [1]},
        "features": ["live:orders_7d", "history:lifetime_orders"],
        # A miss counts against the backend for what is left after twice the event loop's lag meanwhile
        # (Gateway.blames): 300 ms keeps a loaded box's lag from excusing the frozen server.
        "deadline_ms": 300,
    }
    try:
        registry = names.registry(names.backend("redis", url=server.url), names.backend("sqlite"))
        async with gateway(registry, breaker_failures=3, breaker_reset_ms=60_000) as client:
            # Connected, and a success on the breaker's count: a first read slower than 100 ms on a loaded box
            # would otherwise be a fourth failure, and the circuit would open one answer early.
            warm = await fetch(client, **{**request, "deadline_ms": 5000})
            server.freeze()  # no error ever comes back: only the deadline
            # Until the circuit opens, and two more. On a box loaded enough that the event loop itself lagged
            # through a whole wait, that miss is excused (Gateway.blames) and the circuit opens a miss later:
            # how many misses it takes is test_breaker's; here, that a frozen server ends up skipped.
            answers: list[dict[str, Any]] = []
            while len(answers) < 12 and [a["backends"]["hot"]["status"] for a in answers[-2:]] != ["open"] * 2:
                answers.append(await fetch(client, **request))
            tight = await fetch(client, **{**request, "deadline_ms": 5})
    finally:
        server.thaw()
        server.stop()
    assert warm["backends"]["hot"]["status"] == "ok"
    statuses = [a["backends"]["hot"]["status"] for a in answers]
    opened = statuses.index("open")
    assert opened >= 3  # never before 3 misses
    assert statuses == ["timeout"] * opened + ["open"] * 2
    assert answers[-1]["backends"]["hot"]["ms"] == 0
    assert answers[-1]["rows"][0]["statuses"] == ["UNAVAILABLE", "MISSING"]
    assert tight["backends"]["hot"]["status"] == "open"


async def test_writes_the_server_refuses_do_not_open_the_read_circuit(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("redis")), breaker_failures=2) as client:
        await write(client, "live", [live_row(1, 1)])
        admin = redis.Redis.from_url(REDIS_URL)
        await admin.hset(f"{names.prefix}live:9", "not", "a blob")  # the write script's GET: WRONGTYPE
        await admin.aclose()
        refused = [
            (await client.post("/v1/features/write", json={"group": "live", "rows": [live_row(9, 1)]})).status_code
            for _ in range(4)
        ]
        answer = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
    assert refused == [503] * 4
    assert answer["backends"]["hot"]["status"] == "ok"
    assert answer["rows"][0]["statuses"] == ["PRESENT"]


async def _migrated(client: object, name: str) -> bool:
    return bool(client.app.state.gateway.migrated[name])  # type: ignore[attr-defined]
