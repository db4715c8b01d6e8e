"""Overlapping batch writes on one group: none deadlocks another, and write trouble never takes reads down."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.gateways import GatewayFactory
from tests.support.registries import PG_DSN, Names

IDS = list(range(1, 31))


def history_row(consumer: int, orders: int, at: datetime) -> dict[str, Any]:
    return {
        "consumer_id": consumer,
        "event_timestamp": at.isoformat().replace("+00:00", "Z"),
        "lifetime_orders": orders,
        "lifetime_value": orders / 2,
    }


async def read_history(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post(
        "/v1/features/fetch", json={"entities": {"consumer_id": IDS}, "features": ["history:lifetime_orders"]}
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_overlapping_batches_on_postgres_all_land_and_reads_stay_present(
    gateway: GatewayFactory, names: Names
) -> None:
    """30 concurrent batches, each 20 of the same 30 entities in random order, with a reader alongside."""
    rng = random.Random(8)
    base = datetime.now(UTC) - timedelta(minutes=1)
    batches = [rng.sample(IDS, 20) for _ in range(30)]
    async with gateway(names.registry(names.backend("cockroach"))) as client:
        seeded = await client.post(
            "/v1/features/write", json={"group": "history", "rows": [history_row(c, 0, base) for c in IDS]}
        )
        assert seeded.status_code == 200, seeded.text
        writing = True
        reads: list[dict[str, Any]] = []

        async def reader() -> None:
            while writing:
                reads.append(await read_history(client))
                await asyncio.sleep(0.005)

        async def send(n: int, ids: list[int]) -> httpx.Response:
            # Batch n's rows are newer than batch n-1's: the newest batch of an entity decides its value.
            at = base + timedelta(milliseconds=n + 1)
            rows = [history_row(c, 1000 * (n + 1) + c, at) for c in ids]
            return await client.post("/v1/features/write", json={"group": "history", "rows": rows})

        reading = asyncio.create_task(reader())
        answers = await asyncio.gather(*(send(n, ids) for n, ids in enumerate(batches)))
        writing = False
        await reading
        final = await read_history(client)
        ready = (await client.get("/readyz")).json()

    assert [a.status_code for a in answers] == [200] * 30, [a.text for a in answers if a.status_code != 200][:3]
    assert sum(a.json()["written"] + a.json()["skipped_stale"] for a in answers) == 30 * 20
    assert reads, "the reader never completed a fetch"
    statuses = {s for answer in reads for row in answer["rows"] for s in row["statuses"]}
    assert statuses == {"PRESENT"}, f"{len(reads)} reads saw {statuses}"
    assert ready["circuits"]["bulk"] == "closed"
    newest = {c: max(n for n, ids in enumerate(batches) if c in ids) for c in IDS if any(c in b for b in batches)}
    served = {row["entity"]["consumer_id"]: row["values"][0] for row in final["rows"]}
    assert served == {c: 1000 * (newest[c] + 1) + c if c in newest else 0 for c in IDS}


async def test_failing_writes_never_open_the_read_circuit(
    gateway: GatewayFactory, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes that cannot get their locks time out and open the write circuit; reads stay PRESENT and closed."""
    registry = names.registry(names.backend("cockroach"))
    async with gateway(registry, write_timeout_ms=200) as client:
        now = datetime.now(UTC)
        seeded = await client.post(
            "/v1/features/write", json={"group": "history", "rows": [history_row(c, 7, now) for c in IDS]}
        )
        assert seeded.status_code == 200, seeded.text
        blocker = await asyncpg.connect(PG_DSN)
        try:
            # EXCLUSIVE lets SELECTs through and blocks every INSERT/UPDATE: writes fail, the server is fine.
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute(f'LOCK TABLE "{names.schema}"."feature_values" IN EXCLUSIVE MODE')
            caplog.set_level(logging.WARNING)
            refused = []
            for i in range(8):
                response = await client.post(
                    "/v1/features/write", json={"group": "history", "rows": [history_row(1, i, datetime.now(UTC))]}
                )
                refused.append(response.status_code)
            answer = await read_history(client)
            ready = (await client.get("/readyz")).json()
            await transaction.rollback()
        finally:
            await blocker.close()
    assert refused == [503] * 8
    assert {s for row in answer["rows"] for s in row["statuses"]} == {"PRESENT"}, answer["backends"]
    assert ready["circuits"]["bulk"] == "closed"
    assert ready["write_circuits"]["bulk"] == "open"
    failures = [r for r in caplog.records if r.name == "app.serving.write" and "bulk" in r.getMessage()]
    assert failures, "a failed write was not logged"
    assert "timed out" in failures[0].getMessage()
