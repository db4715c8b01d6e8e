"""The bench's data: generated from the registry's dtypes with a seeded RNG, loaded through the gateway's
own write path (POST /v1/features/write in batches), then checked by reading a sample back.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

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
    return list(iter_values(group, entities, seed))


def iter_values(group: Group, entities: int, seed: int) -> Iterator[list[Any]]:
    """`generate` one entity at a time: the first n rows of a larger draw are those of `generate(group, n, seed)`,
    so more entities can be added later to data already loaded without holding them all."""
    rng = random.Random(f"{seed}:{group.name}")
    width = len(group.features)
    for _ in range(entities):
        yield [_value(group, i, rng) for i in range(width)]


def zipf_ids(entities: int, s: float, n: int, seed: int, stream: int = 0) -> list[int]:
    """`n` ids drawn with P(rank k) ~ 1/k^s over `entities` ranks, ranks mapped to the ids FIRST_ID.. by a
    permutation drawn from `seed`, so the hot ids are spread over the key space and the table rather than being
    1, 2, 3... Draws of another `stream` (a warm-up) are other draws of the same distribution: same hot ids."""
    weights = 1.0 / np.arange(1, entities + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ids = np.random.default_rng(seed).permutation(entities) + FIRST_ID  # rank k (0-based) -> id
    ranks = np.minimum(np.searchsorted(cdf, np.random.default_rng([seed, stream]).random(n)), entities - 1)
    return [int(i) for i in ids[ranks]]


def zipf_top_share(entities: int, s: float) -> float:
    """The probability of the most frequent id under Zipf(s) over `entities`: 1 / H(entities, s)."""
    return float(1.0 / np.sum(1.0 / np.arange(1, entities + 1, dtype=np.float64) ** s))


def write_ids(path: Path, ids: Sequence[int]) -> Path:
    """One id a line, for bench/fetch.lua's IDS argument."""
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


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
    expected = {i: {name: values[i - FIRST_ID] for name, values in data.items()} for i in ids}
    await check_values(client, registry, expected)


async def check_values(
    client: httpx.AsyncClient, registry: Registry, expected: dict[int, dict[str, list[Any]]], label: str = ""
) -> None:
    """Fetch these ids with every feature of the groups given: all PRESENT and equal to the values written
    (`expected`: id -> group -> values in registry order, every id the same groups)."""
    ids = list(expected)
    names = list(expected[ids[0]])
    features = [f"{name}:*" for name in names]
    what = f"reading back the data{label}"
    response = await client.post(
        "/v1/features/fetch",
        json={"entities": {JOIN_KEY: ids}, "features": features, "deadline_ms": 5000, "strict": True},
    )
    if response.status_code != 200:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    expected_refs = [f.ref for name in names for f in registry.groups[name].features]
    if body["features"] != expected_refs:
        raise BenchError(f"{what}: the features served are not the ones asked for, in order")
    for entity_id, row in zip(ids, body["rows"], strict=True):
        values: list[Any] = []
        for name in names:
            group = registry.groups[name]
            values += [_served(group, i, v) for i, v in enumerate(expected[entity_id][name])]
        if row["entity"] != {JOIN_KEY: entity_id}:
            raise BenchError(f"{what}: rows out of order at {JOIN_KEY}={entity_id}")
        if set(row["statuses"]) != {"PRESENT"}:
            raise BenchError(f"{what}: {JOIN_KEY}={entity_id} has statuses {set(row['statuses'])}")
        if row["values"] != values:
            raise BenchError(f"{what}: {JOIN_KEY}={entity_id} has other values than were written")


MSGPACK = "application/msgpack"


async def verify_msgpack(client: httpx.AsyncClient, ids: Sequence[int], features: Sequence[str]) -> str:
    """Fetch the same request as JSON and with `Accept: application/msgpack`; when the answer says it is
    MessagePack it must decode (msgspec) to the JSON answer's features, entities, statuses and values.
    Returns the Content-Type the server answered the msgpack request with (JSON from a server that does not
    speak MessagePack yet: then there is nothing to check, and the bench says what its row measured)."""
    body = {"entities": {JOIN_KEY: list(ids)}, "features": list(features), "deadline_ms": 5000, "strict": True}
    as_json = await client.post("/v1/features/fetch", json=body)
    packed = await client.post("/v1/features/fetch", json=body, headers={"Accept": MSGPACK})
    for answer in (as_json, packed):
        if answer.status_code != 200:
            raise BenchError(f"the msgpack check: HTTP {answer.status_code}: {answer.text[:500]}")
    content_type = str(packed.headers.get("content-type", ""))
    if not content_type.startswith(MSGPACK):
        return content_type
    try:
        decoded = msgspec.msgpack.decode(packed.content)
    except msgspec.DecodeError as exc:
        raise BenchError(f"the msgpack answer ({len(packed.content)} bytes) does not decode: {exc}") from None
    expected = as_json.json()
    if not isinstance(decoded, dict) or decoded.get("features") != expected["features"]:
        raise BenchError("the msgpack answer does not list the JSON answer's features")
    rows = decoded.get("rows")
    if not isinstance(rows, list) or len(rows) != len(expected["rows"]):
        raise BenchError("the msgpack answer has not the JSON answer's rows")
    for got, want in zip(rows, expected["rows"], strict=True):
        for key in ("entity", "statuses", "values"):
            if not isinstance(got, dict) or got.get(key) != want[key]:
                raise BenchError(f"the msgpack answer's {key} differ from the JSON answer's at {want['entity']}")
    return content_type
