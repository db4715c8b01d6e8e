"""The tile stores of the streaming groups (backends/base.py TileStore) on each backend, real servers: a batch
applied twice, and batches overlapping in events and tiles applied concurrently, count every event exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.registry.load import parse_registry
from app.streams.aggregates import Function
from app.streams.tiles import (
    Aggregation,
    Event,
    batch_for_store,
    decode_partials,
    fold,
    tile_partials,
    tiles_needed,
    window_values,
)
from app.streams.windows import Window
from backends import open_backend
from tests.support.registries import Names
from tests.support.streams import AGGREGATIONS as STREAM_AGGREGATIONS
from tests.support.streams import BY_NAME as STREAM_BY_NAME
from tests.support.streams import Arrival, arrivals, compare, ingest_in_batches

S = 1_000_000
# The hour before the last full hour: recent, so Redis keeps the tiles (they expire with their tile + KEEP_US)
BASE = (time.time_ns() // 1000 // (3600 * S) - 1) * 3600 * S
WINDOWS = (Window.of("1m", 60), Window.of("1h", 3600))
AGGREGATIONS = [
    Aggregation("n", Function.COUNT, None, WINDOWS),
    Aggregation("total", Function.SUM, "value", WINDOWS),
    Aggregation("kinds", Function.COUNT_DISTINCT, "kind", WINDOWS[1:]),
]
BY_NAME = {a.name: a for a in AGGREGATIONS}
KEEP_US = 7200 * S


def events(count: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    return [
        Event(f"e{i}", f"c{rng.randrange(5)}", BASE + rng.randrange(3600 * S), {"value": float(i), "kind": f"k{i % 7}"})
        for i in range(count)
    ]


async def apply(store: Any, batch: list[Event]) -> int:
    by_id = {e.event_id: e for e in batch}
    tiles = [(entity, size, start) for entity, size, start in tile_partials(AGGREGATIONS, batch)]

    def fold_new(new: set[str], stored: Any) -> dict[Any, bytes]:
        out = {}
        for entity in {by_id[i].entity for i in new}:
            mine = [by_id[i] for i in new if by_id[i].entity == entity]
            mine_stored = {(s, t): b for (e, s, t), b in stored.items() if e == entity}
            out.update({(entity, s, t): b for (s, t), b in fold(BY_NAME, mine, mine_stored).items()})
        return out

    events = {i: e.entity for i, e in by_id.items()}
    keep = {w.tile_s: KEEP_US for w in WINDOWS}
    return int(await store.apply("orders", events, tiles, fold_new, KEEP_US, keep))


async def test_a_redis_that_forgot_the_tile_script_gets_it_again(names: Names) -> None:
    """A restarted Redis has no scripts: the tile batch loads its own and goes on (nothing counted twice)."""
    import redis.asyncio as redis

    from tests.support.registries import REDIS_URL

    registry = parse_registry(names.registry(names.backend("redis")), "test-registry", env={})
    store = open_backend(registry.backends["hot"], registry)
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        sent = events(40, seed=3)
        assert await apply(store, sent[:20]) == 20
        await admin.script_flush()
        assert await apply(store, sent) == 20
        assert await apply(store, sent) == 0
    finally:
        await admin.aclose()
        await store.aclose()


@pytest.mark.parametrize("kind", ["sqlite", "redis", "cockroach"])
async def test_overlapping_and_repeated_batches_count_each_event_once(names: Names, kind: str) -> None:
    text = names.registry(names.backend(kind))
    registry = parse_registry(text, "test-registry", env={})
    store = open_backend(registry.backends["hot"], registry)
    try:
        await store.migrate()
        sent = events(800, seed=7)
        # Eight batches of 100, each overlapping its neighbours by half, all at once (the shared ids make them
        # queue behind each other); then eight of 50 with no id in common but the same tiles, all at once (only
        # the tiles' own locking keeps them apart); then every batch again
        batches = [sent[i : i + 100] for i in range(0, 351, 50)] + [sent[i : i + 50] for i in range(400, 800, 50)]
        first = await asyncio.gather(*(apply(store, b) for b in batches[:8]))
        first += await asyncio.gather(*(apply(store, b) for b in batches[8:]))
        again = await asyncio.gather(*(apply(store, b) for b in batches))
        at = BASE + 3599 * S
        by_entity = {}
        for entity in {e.entity for e in sent}:
            wanted = sorted({(w.tile_s, start) for a in AGGREGATIONS for w in a.windows for start in w.tiles(at)})
            blobs = await store.read_tiles("orders", [entity], wanted)  # type: ignore[attr-defined]
            tiles = {ref: decode_partials(b) for ref, b in zip(wanted, blobs, strict=True) if b is not None}
            by_entity[entity] = window_values(AGGREGATIONS, tiles, at)
    finally:
        await store.aclose()
    assert sum(first) == 800  # every event new exactly once, whichever batch got it first
    assert sum(again) == 0
    for entity, values in by_entity.items():
        mine = [e for e in sent if e.entity == entity]
        assert values["n_1h"] == len(mine)
        assert values["total_1h"] == pytest.approx(sum(e.fields["value"] for e in mine), rel=1e-12)
        assert values["kinds_1h"] == len({e.fields["kind"] for e in mine})
        last_minute = [e for e in mine if WINDOWS[0].counts(at, e.event_us)]
        assert values["n_1m"] == len(last_minute)


# -- the window rule's property, through each store --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "redis", "cockroach"])
def test_served_values_equal_a_recomputation_on_every_backend(names: Names, kind: str) -> None:
    """tests/test_stream_windows.py's property, the tiles stored and read back by a real backend: late, resent and
    out-of-order events over the last two hours, read during the last minutes (Redis drops tiles past the longest
    window plus the lateness, which no read of now needs)."""
    registry = parse_registry(names.registry(names.backend(kind)), "test-registry", env={})
    examples = iter(range(1_000_000))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(events=arrivals, reads=st.lists(st.integers(-240 * S, 0), min_size=1, max_size=3), batch=st.integers(1, 40))
    def check_one(events: list[Arrival], reads: list[int], batch: int) -> None:
        now = time.time_ns() // 1000
        base = now - 7200 * S  # arrivals' event times fall in the last two hours
        group = f"p{next(examples)}"  # each example on a group of its own

        async def scenario() -> None:
            store: Any = open_backend(registry.backends["hot"], registry)
            try:
                await store.migrate()
                batches: list[list[Event]] = []
                accepted, _, _ = ingest_in_batches(events, base, batch, batches.append)
                for fresh in batches:
                    if fresh:
                        ids, tiles, fold_new = batch_for_store(STREAM_BY_NAME, fresh)
                        keep = {s: 4 * 3600 * S for _, s, _ in tiles}
                        await store.apply(group, ids, tiles, fold_new, 4 * 3600 * S, keep)
                for entity in ("a", "b", "c"):
                    for offset in reads:
                        at = now + offset
                        needed = sorted(tiles_needed(STREAM_AGGREGATIONS, at))
                        blobs = await store.read_tiles(group, [entity], needed)
                        tiles = {ref: decode_partials(b) for ref, b in zip(needed, blobs, strict=True) if b is not None}
                        compare(entity, window_values(STREAM_AGGREGATIONS, tiles, at), at, accepted)
            finally:
                await store.aclose()

        asyncio.run(scenario())

    check_one()


async def test_redis_prunes_an_entity_s_tiles_past_their_keep(names: Names) -> None:
    """Redis keeps an entity's tiles in one hash that expires as a whole (7.0 has no field expiry): a write that
    finds more fields than its windows can read removes those past their keep, and every value stays exact."""
    import redis.asyncio as redis

    from tests.support.registries import REDIS_URL

    registry = parse_registry(names.registry(names.backend("redis")), "test-registry", env={})
    store: Any = open_backend(registry.backends["hot"], registry)
    admin = redis.Redis.from_url(REDIS_URL)
    windows = (Window.of("10s", 10), Window.of("1h", 3600))  # 1 s and 1 min tiles
    aggregations = [Aggregation("n", Function.COUNT, None, windows)]
    by_name = {a.name: a for a in aggregations}
    keep = {w.tile_s: w.seconds * S for w in windows}  # no lateness
    now = time.time_ns() // 1000
    sent = [Event(f"e{i}", "c1", now - (600 - i) * S, {}) for i in range(600)]  # one a second, 10 minutes
    try:
        for start in range(0, 600, 50):  # in order, as a stream would bring them
            ids, tiles, fold_new = batch_for_store(by_name, sent[start : start + 50])
            assert await store.apply("pruned", ids, tiles, fold_new, 3600 * S, keep) == 50
        fields = await admin.hlen(f"{names.prefix}~tiles:pruned:c1")
        at = time.time_ns() // 1000
        layout_tiles = sorted(tiles_needed(aggregations, at))
        blobs = await store.read_tiles("pruned", ["c1"], layout_tiles)
        found = {ref: decode_partials(b) for ref, b in zip(layout_tiles, blobs, strict=True) if b is not None}
        values = window_values(aggregations, found, at)
    finally:
        await admin.aclose()
        await store.aclose()
    # 600 one-second tiles and 11 one-minute tiles were written; what is left is what a read can still need
    assert fields < 200, fields
    assert values["n_1h"] == 600
    assert values["n_10s"] == sum(1 for e in sent if windows[0].counts(at, e.event_us))


async def test_redis_takes_one_entity_s_batch_touching_thousands_of_tiles(names: Names) -> None:
    """A backfill of one entity: more tiles in one script call than Lua can unpack at once."""
    registry = parse_registry(names.registry(names.backend("redis")), "test-registry", env={})
    store: Any = open_backend(registry.backends["hot"], registry)
    windows = (Window.of("1h", 3600),)  # 1 min tiles
    aggregations = [Aggregation("n", Function.COUNT, None, windows)]
    now = time.time_ns() // 1000
    sent = [Event(f"b{i}", "c1", now - i * 60 * S, {}) for i in range(6000)]  # one a minute, back 100 hours
    try:
        ids, tiles, fold_new = batch_for_store({"n": aggregations[0]}, sent)
        assert len(tiles) == 6000
        assert await store.apply("backfill", ids, tiles, fold_new, 200 * 3600 * S, {60: 200 * 3600 * S}) == 6000
        at = time.time_ns() // 1000
        needed = sorted(tiles_needed(aggregations, at))
        blobs = await store.read_tiles("backfill", ["c1"], needed)
        found = {ref: decode_partials(b) for ref, b in zip(needed, blobs, strict=True) if b is not None}
        assert window_values(aggregations, found, at)["n_1h"] == sum(
            1 for e in sent if windows[0].counts(at, e.event_us)
        )
    finally:
        await store.aclose()
