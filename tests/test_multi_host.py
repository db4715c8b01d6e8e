"""Multi-host CockroachDB DSNs (`postgresql://u@h1:26257,h2:26257/db`): the gateway uses the first host that answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from tests.support.clients import fetch, write
from tests.support.gateways import GatewayFactory
from tests.support.registries import PG_DSN, Names
from tests.support.servers import free_port


def with_hosts_before(dsn: str, *hosts: str) -> str:
    """PG_DSN with `hosts` listed before its own host."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    netloc = ",".join([*hosts, host])
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A port that accepts connections and never answers (a stopped node, a hung process), and the
    connections it has accepted."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), held
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_a_dsn_whose_first_host_is_closed_uses_the_next(gateway: GatewayFactory, names: Names) -> None:
    dsn = with_hosts_before(PG_DSN, f"127.0.0.1:{free_port()}")
    async with gateway(names.registry(names.backend("sqlite"), names.backend("cockroach", dsn=dsn))) as client:
        ready = await client.get("/readyz")
        await write(client, "history", [{"consumer_id": 1, "lifetime_orders": 8, "lifetime_value": 2.5}])
        answer = await fetch(client, entities={"consumer_id": [1, 2]}, features=["history:*"])
    assert ready.status_code == 200, ready.text
    assert answer["backends"]["bulk"]["status"] == "ok"
    assert [row["values"] for row in answer["rows"]] == [[8, 2.5], [-1, None]]


CONNECT_TIMEOUT_S = 0.3
STARTUP_MARGIN_S = 1.7  # the rest of start-up: ~0.05 s idle, 0.35 s in all measured at load average 4 to 6


async def test_a_first_host_that_never_answers_costs_one_connect_timeout(gateway: GatewayFactory, names: Names) -> None:
    async with silent_server() as (port, accepted):
        dsn = with_hosts_before(PG_DSN, f"127.0.0.1:{port}")
        bulk = names.backend("cockroach", dsn=dsn).replace(
            "dialect: postgres", f"dialect: postgres, connect_timeout_ms: {CONNECT_TIMEOUT_S * 1000:g}"
        )
        started = time.perf_counter()
        async with gateway(names.registry(names.backend("sqlite"), bulk)) as client:
            migrated = client.app.state.gateway.migrated["bulk"]  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - started
            tried_silent_host = len(accepted)
            await write(client, "history", [{"consumer_id": 1, "lifetime_orders": 8, "lifetime_value": None}])
            answer = await fetch(client, entities={"consumer_id": [1]}, features=["history:lifetime_orders"])
    # asyncpg alone spends its one connect timeout on the silent host and never tries the next.
    assert migrated is True
    assert tried_silent_host == 1  # one connection to the silent host at start-up: one connect timeout spent
    assert CONNECT_TIMEOUT_S <= elapsed < CONNECT_TIMEOUT_S + STARTUP_MARGIN_S
    assert answer["rows"][0]["values"] == [8]


async def test_no_host_answering_is_unavailable(gateway: GatewayFactory, names: Names) -> None:
    dsn = f"postgresql://root@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/test"
    async with gateway(names.registry(names.backend("sqlite"), names.backend("cockroach", dsn=dsn))) as client:
        answer = await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d", "history:*"])
        ready = await client.get("/readyz")
    assert answer["backends"]["bulk"]["status"] == "error"
    assert answer["rows"][0]["statuses"] == ["MISSING", "UNAVAILABLE", "UNAVAILABLE"]
    assert ready.status_code == 503
