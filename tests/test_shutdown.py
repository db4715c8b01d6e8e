"""Graceful shutdown of the real server process: SIGTERM stops accepting, drains the requests in flight,
then the lifespan closes every pool and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as redis

from tests.support.faults import keep_redis_busy
from tests.support.gateways import GatewayProcess
from tests.support.servers import RedisProcess, unread_bytes
from tests.support.waiting import eventually

IN_FLIGHT = 8
BUSY_MS = 2000  # how long the Lua script holds the gateway's Redis, so its reads are in flight for that long

REGISTRY = """
backends:
  hot: {{type: redis, url: "{redis_url}", timeout_ms: 5000}}
  bulk: {{type: sqlite, path: "{sqlite}"}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    features:
      orders: {{dtype: int64, default: 0}}
      name: {{dtype: string}}
  history:
    entity: consumer
    backend: bulk
    features:
      lifetime: {{dtype: int64, default: -1}}
"""


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


async def gateway_clients(admin: redis.Redis) -> int:
    clients = await admin.client_list()
    return sum(1 for c in clients if c.get("name", "").startswith("feature-gateway:hot"))


async def test_sigterm_drains_in_flight_requests_then_closes_pools(tmp_path: Path) -> None:
    store = RedisProcess()
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(redis_url=store.url, sqlite=tmp_path / "bulk.sqlite"))
    server = GatewayProcess(registry, tmp_path / "gateway.log", "--graceful-timeout", "10")
    async with contextlib.AsyncExitStack() as stack:  # everything is stopped however the test ends
        stack.callback(store.stop)
        stack.callback(server.stop)
        admin = redis.Redis.from_url(store.url)
        stack.push_async_callback(admin.aclose)
        store.start()
        server.start()
        ids = list(range(1, 21))
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for group, row in (("live", {"orders": 7, "name": "n"}), ("history", {"lifetime": 70})):
                response = await client.post(
                    "/v1/features/write", json={"group": group, "rows": [{"consumer_id": i, **row} for i in ids]}
                )
                assert response.status_code == 200, response.text
            body = {"entities": {"consumer_id": ids}, "features": ["live:*", "history:*"], "deadline_ms": 5000}
            warm = await client.post("/v1/features/fetch", json=body)  # the read path connects before Redis is busy
            assert warm.status_code == 200, warm.text
            assert not warm.json()["degraded"], warm.text
            assert await gateway_clients(admin) > 0

            started = time.monotonic()  # before Redis is busy: no answer can come sooner than BUSY_MS after this
            busy = asyncio.create_task(keep_redis_busy(admin, BUSY_MS * 1000))
            await asyncio.sleep(0.05)
            sent = 0

            async def count_sent(event: str, info: dict[str, Any]) -> None:
                nonlocal sent
                sent += event == "http11.send_request_body.complete"

            in_flight = [
                asyncio.create_task(client.post("/v1/features/fetch", json=body, extensions={"trace": count_sent}))
                for _ in range(IN_FLIGHT)
            ]

            async def all_read_by_the_server() -> bool:
                return sent == IN_FLIGHT and not any(unread_bytes(server.port))

            # Every request was sent and the server has read it (nothing waits in its sockets): each is in
            # flight in the gateway, waiting on the busy Redis, when the SIGTERM comes.
            await eventually(all_read_by_the_server)
            assert not any(task.done() for task in in_flight)

            server.signal(signal.SIGTERM)
            stop_accepting = time.monotonic()
            while not await asyncio.to_thread(refused, server.port):
                assert time.monotonic() - stop_accepting < 2, "still accepting connections 2 s after SIGTERM"
                await asyncio.sleep(0.02)
            refused_after = time.monotonic() - stop_accepting
            assert not any(task.done() for task in in_flight), "a request ended before Redis answered"
            assert server.running(), "exited before draining"

            responses = await asyncio.gather(*in_flight)
            drained = time.monotonic() - started
            await busy
        code = await asyncio.to_thread(server.wait, 15)
        log = server.log()
        assert await gateway_clients(admin) == 0

    for response in responses:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["degraded"] is False, answer["backends"]
        assert [row["values"] for row in answer["rows"]] == [[7, "n", 70]] * len(ids)
        assert all(row["statuses"] == ["PRESENT"] * 3 for row in answer["rows"])
    assert drained >= BUSY_MS / 1000 - 0.1  # they really waited on Redis through the shutdown
    assert refused_after < 1.0
    assert code == 0, log
    assert "Waiting for connections to close" in log
    assert "closed backends bulk, hot" in log
    assert "Application shutdown complete" in log
    assert "did not close cleanly" not in log
    assert log.index("Waiting for connections to close") < log.index("closed backends")
    print(
        f"\nshutdown: {IN_FLIGHT} in-flight fetches drained in {drained:.2f} s, refused new connections "
        f"{refused_after * 1000:.0f} ms after SIGTERM, exit {code}"
    )
