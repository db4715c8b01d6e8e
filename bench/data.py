"""The bench's data: generated from the registry's dtypes with a seeded RNG, loaded through the gateway's
own write path (POST /v1/features/write in batches), then checked by reading a sample back.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from typing import Any

import httpx

from app.registry.model import Group, Registry
from bench.procs import BenchError

JOIN_KEY = "consumer_id"
FIRST_ID = 1  # entity ids are FIRST_ID .. FIRST_ID + entities - 1


def entity_ids(entities: int) -> range:
    return range(FIRST_ID, FIRST_ID + entities)


def _value(group: Group, index: int, rng: random.Random) -> Any:
    dtype = group.features[index].dtype
    if dtype.kind == "int64":
        return rng.randrange(1000)  # uniform 0-999
    if dtype.kind == "float64":
        return rng.random() * 1000
    if dtype.kind == "array" and dtype.item in "fd":
        return [rng.uniform(-1.0, 1.0) for _ in range(dtype.length)]
    if dtype.kind == "array":
        return [rng.randrange(1000) for _ in range(dtype.length)]
    raise BenchError(f"the bench generates numeric features only; {group.name}:{group.features[index].name} is {dtype}")


def generate(group: Group, entities: int, seed: int) -> list[list[Any]]:
    """Per entity (in id order), the group's values in registry order; the same seed gives the same data."""
    rng = random.Random(f"{seed}:{group.name}")
    width = len(group.features)
    return [[_value(group, i, rng) for i in range(width)] for _ in range(entities)]


def _rows(group: Group, ids: Sequence[int], values: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    names = [f.name for f in group.features]
    return [{JOIN_KEY: i, **dict(zip(names, v, strict=True))} for i, v in zip(ids, values, strict=True)]


async def write_rows(
    client: httpx.AsyncClient, group: Group, ids: Sequence[int], values: Sequence[Sequence[Any]], batch: int
) -> None:
    """Write through POST /v1/features/write; every row must be written (none stale, none rejected)."""
    for start in range(0, len(ids), batch):
        rows = _rows(group, ids[start : start + batch], values[start : start + batch])
        response = await client.post("/v1/features/write", json={"group": group.name, "rows": rows})
        if response.status_code != 200:
            raise BenchError(f"writing {group.name}: HTTP {response.status_code}: {response.text[:500]}")
        written = response.json().get("written")
        if written != len(rows):
            raise BenchError(f"writing {group.name}: {written} of {len(rows)} rows written: {response.text[:500]}")


def _served(group: Group, index: int, value: Any) -> Any:
    """What the gateway serves for a written value (float32 arrays come back rounded to float32)."""
    dtype = group.features[index].dtype
    if dtype.kind == "array":
        fmt = f"<{dtype.length}{dtype.item}"
        return list(struct.unpack(fmt, struct.pack(fmt, *value)))
    return value


async def verify(
    client: httpx.AsyncClient,
    registry: Registry,
    data: dict[str, list[list[Any]]],
    entities: int,
    samples: int,
    seed: int,
) -> None:
    """Fetch a random sample of entities with every feature: all PRESENT and equal to what was written.

    Guards the numbers: a gateway that served defaults or MISSING fast would otherwise look like a win.
    """
    rng = random.Random(f"{seed}:verify")
    ids = rng.sample(list(entity_ids(entities)), min(samples, entities))
    features = [f"{name}:*" for name in data]
    response = await client.post(
        "/v1/features/fetch",
        json={"entities": {JOIN_KEY: ids}, "features": features, "deadline_ms": 5000, "strict": True},
    )
    if response.status_code != 200:
        raise BenchError(f"reading back the data: HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    expected_refs = [f.ref for name in data for f in registry.groups[name].features]
    if body["features"] != expected_refs:
        raise BenchError("reading back the data: the features served are not the ones asked for, in order")
    for entity_id, row in zip(ids, body["rows"], strict=True):
        expected: list[Any] = []
        for name, values in data.items():
            group = registry.groups[name]
            stored = values[entity_id - FIRST_ID]
            expected += [_served(group, i, v) for i, v in enumerate(stored)]
        if row["entity"] != {JOIN_KEY: entity_id}:
            raise BenchError(f"reading back the data: rows out of order at {JOIN_KEY}={entity_id}")
        if set(row["statuses"]) != {"PRESENT"}:
            raise BenchError(f"reading back the data: {JOIN_KEY}={entity_id} has statuses {set(row['statuses'])}")
        if row["values"] != expected:
            raise BenchError(f"reading back the data: {JOIN_KEY}={entity_id} has other values than were written")
