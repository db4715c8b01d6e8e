"""Events into per-tile partial aggregates, and tiles back into windowed values (the rule in windows.py).

A batch of events becomes one partial per (entity, tile size, tile start) holding a partial per aggregation that
has a window of that tile size: pre-aggregated here, so a store merges one partial per tile per batch (a Lua script
or one SQL statement) however many events the batch had. Reading a value merges the tiles of its window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from app.streams.aggregates import ADD, Function, finish, merge
from app.streams.windows import Window, tile_start

TileKey = tuple[str, int, int]  # entity key, tile size (s), tile start (us)
Partials = dict[str, Any]  # aggregation name -> partial


@dataclass(frozen=True, slots=True)
class Aggregation:
    name: str
    function: Function
    field: str | None  # None for count
    windows: tuple[Window, ...]

    @property
    def features(self) -> list[str]:
        """Its features, one per window: `order_count_10m`."""
        return [f"{self.name}_{w.name}" for w in self.windows]

    @property
    def tile_sizes(self) -> list[int]:
        return sorted({w.tile_s for w in self.windows})


@dataclass(frozen=True, slots=True)
class Event:
    """An accepted event: its id, its entity's storage key, its event time and its typed fields."""

    event_id: str
    entity: str
    event_us: int
    fields: Mapping[str, Any]


def tile_partials(aggregations: Sequence[Aggregation], events: Iterable[Event]) -> dict[TileKey, Partials]:
    """The partials a batch of (accepted, deduplicated) events adds to each tile. An event whose aggregated field
    is null adds nothing to that aggregation (a count counts every event)."""
    tiles: dict[TileKey, Partials] = {}
    layers = [(a, ADD[a.function], a.tile_sizes) for a in aggregations]
    for event in events:
        for aggregation, add, sizes in layers:
            value = None
            if aggregation.field is not None:
                value = event.fields.get(aggregation.field)
                if value is None:
                    continue
            for size in sizes:
                key = (event.entity, size, tile_start(event.event_us, size))
                partials = tiles.get(key)
                if partials is None:
                    partials = tiles[key] = {}
                partials[aggregation.name] = add(partials.get(aggregation.name), event.event_us, event.event_id, value)
    return tiles


def merge_partials(aggregations: Mapping[str, Aggregation], old: Partials | None, new: Partials) -> Partials:
    """A stored tile's partials with a batch's (what a store does atomically)."""
    merged = dict(old or {})
    for name, partial in new.items():
        merged[name] = merge(aggregations[name].function, merged.get(name), partial)
    return merged


def window_values(
    aggregations: Sequence[Aggregation], tiles: Mapping[tuple[int, int], Partials], at_us: int
) -> dict[str, Any]:
    """Feature -> value at `at_us` from one entity's tiles ((tile size, start) -> partials); None: no value."""
    values: dict[str, Any] = {}
    for aggregation in aggregations:
        function, name = aggregation.function, aggregation.name
        for window in aggregation.windows:
            state = None
            for start in window.tiles(at_us):
                partials = tiles.get((window.tile_s, start))
                if partials is not None:
                    state = merge(function, state, partials.get(name))
            values[f"{name}_{window.name}"] = finish(function, state)
    return values


def tiles_needed(aggregations: Sequence[Aggregation], at_us: int) -> set[tuple[int, int]]:
    """The (tile size, start) of every tile a read at `at_us` merges: what a store fetches for one entity."""
    return {(w.tile_s, start) for a in aggregations for w in a.windows for start in w.tiles(at_us)}


def encode_partials(partials: Partials) -> bytes:
    """A tile's partials as stored: MessagePack of {aggregation: partial} (HyperLogLog registers as a map)."""
    return msgspec.msgpack.encode(partials)


def decode_partials(blob: bytes) -> Partials:
    decoded: Partials = msgspec.msgpack.decode(blob)
    return decoded


def fold(
    aggregations: Mapping[str, Aggregation], events: Iterable[Event], stored: Mapping[tuple[int, int], bytes]
) -> dict[tuple[int, int], bytes]:
    """One entity's new events merged into its stored tiles ((tile size, start) -> blob): the tiles to write.
    What a store runs inside its transaction, between reading the tiles a batch touches and writing them."""
    out: dict[tuple[int, int], bytes] = {}
    for (_, size, start), partials in tile_partials(list(aggregations.values()), events).items():
        old = stored.get((size, start))
        merged = merge_partials(aggregations, None if old is None else decode_partials(old), partials)
        out[(size, start)] = encode_partials(merged)
    return out


def batch_for_store(
    aggregations: Mapping[str, Aggregation], events: Sequence[Event]
) -> tuple[list[str], list[TileKey], Callable[[set[str], Mapping[TileKey, bytes]], dict[TileKey, bytes]]]:
    """A batch as a tile store's `apply` takes it: its event ids, every tile it touches, and the fold that merges
    the events the store has not seen into the stored tiles. The batch's partials are computed once; only when
    the store has seen some of its events already are they computed again, for the others."""
    by_id: dict[str, Event] = {}
    for event in events:
        by_id.setdefault(event.event_id, event)  # a batch repeating an id: its first event counts
    listed = list(aggregations.values())
    everything = tile_partials(listed, by_id.values())

    def fold_new(new: set[str], stored: Mapping[TileKey, bytes]) -> dict[TileKey, bytes]:
        partials = everything if len(new) == len(by_id) else tile_partials(listed, [by_id[i] for i in new])
        out: dict[TileKey, bytes] = {}
        for ref, batch in partials.items():
            old = stored.get(ref)
            out[ref] = encode_partials(
                merge_partials(aggregations, None if old is None else decode_partials(old), batch)
            )
        return out

    return list(by_id), list(everything), fold_new
