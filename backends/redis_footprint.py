"""What groups hold on Redis (backends/base.py `Measured`), for the cost report; shared by the single-node and
cluster backends, which differ only in how they reach their nodes.

What is measured: `MEMORY USAGE key SAMPLES 0` of a sample of each group's keys, times the number of its keys.
That is what Redis reports for a key: its name, its value (every field of a hash: SAMPLES 0) and their
allocations (dict entry, object headers). Not counted: the keys' expiry entries, Redis' own overhead and buffers
(replication, AOF, clients), fragmentation, and replicas (each holds the same again).

How: one walk of the keyspace per node, SCAN MATCH `{prefix}*` COUNT 10,000 (the server filters, so only the
gateway's keys come back; every group of the backend is counted in the same walk), each key classed by its form:

    {prefix}{group}:{entity}              a group's values (backends/redis.py; also a cache's copies)
    {prefix}~tiles:{group}:{entity}       an aggregation group's tiles (backends/redis_tiles.py)
    {prefix}~evt:{group}:{event id}       the event ids it has seen
    {prefix}{{group}:{bucket}}:{entity}   a group's values on Redis Cluster (backends/redis_cluster.py)

A uniform sample (a reservoir) of `SAMPLE` keys per group and form is measured: a form with no more keys than
that is measured whole, so small groups are exact. The walk uses redis-py's pool, not the pipelined read
connection: a SCAN reply of thousands of keys would hold up every fetch queued behind it on that one socket.
A walk still unfinished at its time budget stops, and each count is scaled by the share of the node's keys
(DBSIZE) it walked, about `SCAN_COUNT` per call (`keys_estimated`): a million keys take about 100 calls.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from backends.base import Footprint

SCAN_COUNT = 10_000  # keys walked per SCAN call: a few milliseconds of the server's time
SAMPLE = 256  # keys measured per group and form

Scan = Callable[[int], Awaitable[Any]]  # cursor -> SCAN's reply (next cursor, keys)
Sizes = Callable[[Sequence[bytes]], Awaitable[Sequence[Any]]]  # keys -> MEMORY USAGE of each (None: gone)


class Form(Enum):
    VALUES = "values"
    TILES = "tiles"
    EVENTS = "events"


_FORMS = ((b"~tiles:", Form.TILES), (b"~evt:", Form.EVENTS))


def match_pattern(prefix: str) -> str:
    """SCAN's MATCH for every key under `prefix` (its glob characters escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"


def classify(prefix: bytes, key: bytes, cluster: bool) -> tuple[str, Form] | None:
    """The group and form of a gateway key; None for anything else under the prefix."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if cluster:
        if not rest.startswith(b"{"):
            return None
        tag, closed, _ = rest[1:].partition(b"}")
        group, sep, _ = tag.partition(b":")
        return (group.decode(errors="replace"), Form.VALUES) if closed and sep else None
    for head, form in _FORMS:
        if rest.startswith(head):
            group, sep, _ = rest[len(head) :].partition(b":")
            return (group.decode(errors="replace"), form) if sep else None
    group, sep, _ = rest.partition(b":")
    return (group.decode(errors="replace"), Form.VALUES) if sep else None


@dataclass(slots=True)
class Tally:
    """Keys of one group and form seen by a walk: their count and a uniform sample of them."""

    count: int = 0
    sample: list[bytes] = field(default_factory=list)

    def add(self, key: bytes, rng: random.Random) -> None:
        self.count += 1
        if len(self.sample) < SAMPLE:
            self.sample.append(key)
        else:  # reservoir sampling: every key seen so far stays in with the same chance
            slot = rng.randrange(self.count)
            if slot < SAMPLE:
                self.sample[slot] = key


async def measure_node(
    prefix: str,
    groups: Collection[str],
    *,
    cluster: bool,
    scan: Scan,
    sizes: Sizes,
    dbsize: Callable[[], Awaitable[Any]],
    deadline: float,
) -> dict[str, Footprint]:
    """One node's share of each group: walk its keys until `deadline` (time.monotonic()), measure the samples."""
    wanted = set(groups)
    tallies: dict[tuple[str, Form], Tally] = {}
    rng = random.Random()
    raw_prefix = prefix.encode()
    cursor, calls = 0, 0
    while True:
        reply = await scan(cursor)
        cursor, keys = int(reply[0]), reply[1]
        calls += 1
        for key in keys:
            found = classify(raw_prefix, key, cluster)
            if found is not None and found[0] in wanted:
                tally = tallies.get(found)
                if tally is None:
                    tally = tallies[found] = Tally()
                tally.add(key, rng)
        if cursor == 0 or time.monotonic() >= deadline:
            break
    scale = 1.0
    if cursor != 0:  # cut short: the walk saw about calls * SCAN_COUNT of the node's keys
        total = int(await dbsize())
        scale = max(1.0, total / max(1, calls * SCAN_COUNT))
    sampled = [key for tally in tallies.values() for key in tally.sample]
    measured = dict(zip(sampled, await sizes(sampled), strict=True)) if sampled else {}
    out: dict[str, Footprint] = {}
    for (group, _), tally in tallies.items():
        found_sizes = [int(measured[k]) for k in tally.sample if measured.get(k) is not None]
        count = round(tally.count * scale)
        mean = sum(found_sizes) / len(found_sizes) if found_sizes else 0.0
        exact = scale == 1.0 and len(found_sizes) == tally.count
        part = Footprint(count, round(mean * count), not exact, scale != 1.0)
        out[group] = add(out[group], part) if group in out else part
    return out


def add(a: Footprint, b: Footprint) -> Footprint:
    return Footprint(a.keys + b.keys, a.bytes + b.bytes, a.sampled or b.sampled, a.keys_estimated or b.keys_estimated)


def combine(groups: Collection[str], parts: Sequence[Mapping[str, Footprint]]) -> dict[str, Footprint]:
    """Per group, the sum over nodes (a group no node holds a key of: zero keys, zero bytes)."""
    out = {group: Footprint(0, 0, False) for group in groups}
    for part in parts:
        for group, footprint in part.items():
            out[group] = add(out[group], footprint)
    return out
