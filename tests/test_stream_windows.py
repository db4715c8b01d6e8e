"""The window rule (app/streams/windows.py) held against a brute-force recomputation from the raw events.

Events arrive out of order, some twice, some late, in bursts at tile edges; they go through what ingestion does
(lateness, idempotency by event id, per-batch partials merged into stored tiles) and every served value is compared
with the value recomputed from the accepted events under the documented rule.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.streams.aggregates import HLL_STANDARD_ERROR, hll_estimate, hll_position
from app.streams.tiles import (
    Event,
    decode_partials,
    fold,
    merge_partials,
    tile_partials,
    window_values,
)
from app.streams.windows import Window, tile_size_s
from tests.support.streams import AGGREGATIONS, BY_NAME, Arrival, S, arrivals, compare, ingest_in_batches

BASE = 1_794_960_000 * S  # a fixed epoch time, on a day boundary in UTC (20,775 days)


def test_tile_sizes_keep_a_window_within_60_tiles() -> None:
    assert [tile_size_s(s) for s in (60, 600, 3600, 86400, 7 * 86400, 30 * 86400)] == [1, 10, 60, 1800, 10800, 43200]
    with pytest.raises(ValueError, match="60 equal tiles"):
        tile_size_s(61 * 86400)
    with pytest.raises(ValueError, match="60 equal tiles"):
        tile_size_s(61)  # 61 one-second tiles, and no larger size divides it


def test_the_window_reaches_back_exactly_its_length_in_tile_steps() -> None:
    hour = Window.of("1h", 3600)  # 1 min tiles
    at = BASE + 3 * 3600 * S + 30 * S  # 30 s into a tile
    tiles = hour.tiles(at)
    assert len(tiles) == 60
    assert tiles[-1] == BASE + 3 * 3600 * S  # the tile holding `at`
    assert hour.counts(at, BASE + 2 * 3600 * S + 60 * S)  # the oldest tile's first microsecond
    assert not hour.counts(at, BASE + 2 * 3600 * S + 60 * S - 1)
    assert hour.counts(at, BASE + 3 * 3600 * S + 59 * S)  # later than `at`, inside its tile: counted already
    assert not hour.counts(at, BASE + 3 * 3600 * S + 60 * S)


# -- the property ---------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    events=arrivals, reads=st.lists(st.integers(-600 * S, 9000 * S), min_size=1, max_size=6), batch=st.integers(1, 17)
)
def test_served_values_equal_a_recomputation_from_the_events(
    events: list[Arrival], reads: list[int], batch: int
) -> None:
    store: dict[tuple[str, int, int], dict[str, Any]] = {}

    def apply(fresh: list[Event]) -> None:
        for key, partials in tile_partials(AGGREGATIONS, fresh).items():
            store[key] = merge_partials(BY_NAME, store.get(key), partials)

    accepted, late, duplicates = ingest_in_batches(events, BASE, batch, apply)
    assert late + duplicates + len(accepted) == len(events)
    for entity in ("a", "b", "c"):
        tiles = {(size, start): p for (e, size, start), p in store.items() if e == entity}
        for offset in reads:
            compare(entity, window_values(AGGREGATIONS, tiles, BASE + offset), BASE + offset, accepted)


def test_count_distinct_error_is_as_stated() -> None:
    """10,000 and 100,000 distinct values: within three standard errors (1.6% each)."""
    for n in (10_000, 100_000):
        registers: dict[int, int] = {}
        for value in range(n):
            index, rank = hll_position(f"user-{value}")
            registers[index] = max(registers.get(index, 0), rank)
        assert abs(hll_estimate(registers) - n) <= 3 * HLL_STANDARD_ERROR * n


def test_fold_round_trips_through_the_stored_bytes() -> None:
    """What a store does per batch (read the touched tiles, fold, write) gives what merging in memory gives."""
    events = [Event(f"e{i}", "a", BASE + i * 7 * S, {"value": float(i), "kind": f"k{i % 5}"}) for i in range(300)]
    stored: dict[tuple[int, int], bytes] = {}
    for first in range(0, 300, 40):
        stored.update(fold(BY_NAME, events[first : first + 40], stored))
    in_memory: dict[tuple[int, int], dict[str, Any]] = {}
    for (_, size, start), partials in tile_partials(AGGREGATIONS, events).items():
        in_memory[(size, start)] = partials
    at = BASE + 2100 * S
    from_bytes = window_values(AGGREGATIONS, {k: decode_partials(v) for k, v in stored.items()}, at)
    assert from_bytes == window_values(AGGREGATIONS, in_memory, at)
    assert from_bytes["n_1h"] == 300  # 300 events 7 s apart: 35 minutes, all inside the hour
    assert from_bytes["kinds_1h"] == 5
