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

from app.streams.aggregates import ADD, MERGE, PREPARE, Function, finish
from app.streams.windows import Window

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
    is null adds nothing to that aggregation (a count counts every event).

    The hot loop of ingestion: per event, each tile it falls in is looked up once for all the aggregations that
    tile size serves, and each field value is prepared (hashed, for count_distinct) once."""
    tiles: dict[TileKey, Partials] = {}
    fields = [(a.field, PREPARE.get(a.function)) for a in aggregations]
    by_size: dict[int, list[tuple[int, str, Callable[[Any, int, str, Any], Any]]]] = {}
    for i, aggregation in enumerate(aggregations):
        for size in aggregation.tile_sizes:
            by_size.setdefault(size, []).append((i, aggregation.name, ADD[aggregation.function]))
    layers = [(size, size * 1_000_000, adds) for size, adds in sorted(by_size.items())]
    for event in events:
        event_us, event_id, entity = event.event_us, event.event_id, event.entity
        values: list[Any] = []
        for field, prepare in fields:
            if field is None:
                values.append(True)  # a count: every event
                continue
            value = event.fields.get(field)
            values.append(None if value is None else value if prepare is None else prepare(value))
        for size, size_us, adds in layers:
            key = (entity, size, event_us - event_us % size_us)  # windows.tile_start, inlined
            partials = tiles.get(key)
            if partials is None:
                partials = tiles[key] = {}
            for i, name, add in adds:
                value = values[i]
                if value is not None:
                    partials[name] = add(partials.get(name), event_us, event_id, value)
        # (a tile none of whose aggregations took the event stays empty: only counts and null fields do that)
    return {key: partials for key, partials in tiles.items() if partials}


def merge_partials(aggregations: Mapping[str, Aggregation], old: Partials | None, new: Partials) -> Partials:
    """A stored tile's partials with a batch's (what a store does atomically). `old` is updated in place and
    returned (callers give a freshly decoded tile); with no `old`, `new` itself is the answer."""
    if old is None:
        return new
    for name, partial in new.items():
        prior = old.get(name)
        old[name] = partial if prior is None else MERGE[aggregations[name].function](prior, partial)
    return old


@dataclass(frozen=True, slots=True)
class ReadLayout:
    """What a read at one moment merges, the same for every entity: the tiles to fetch ((size, start), by size
    then oldest first) and, per tile, the windows it is in ((feature, aggregation, function) of each), so a read
    visits only the tiles an entity has, each once. It changes only when one of the tile sizes rolls over, and is
    cached until then (`read_layout`)."""

    tiles: tuple[tuple[int, int], ...]
    covers: tuple[tuple[tuple[str, str, Function], ...], ...]
    features: tuple[tuple[str, Function], ...]  # every feature, with the function that finishes it


_LAYOUTS: dict[tuple[int, ...], tuple[Sequence[Aggregation], ReadLayout]] = {}


def read_layout(aggregations: Sequence[Aggregation], at_us: int) -> ReadLayout:
    sizes = sorted({w.tile_s for a in aggregations for w in a.windows})
    key = (id(aggregations), *(at_us // (size * 1_000_000) for size in sizes))
    cached = _LAYOUTS.get(key)
    if cached is not None and cached[0] is aggregations:
        return cached[1]
    covering: dict[tuple[int, int], list[tuple[str, str, Function]]] = {}
    features: list[tuple[str, Function]] = []
    for aggregation in aggregations:
        for window in aggregation.windows:
            feature = f"{aggregation.name}_{window.name}"
            features.append((feature, aggregation.function))
            cover = (feature, aggregation.name, aggregation.function)
            for start in window.tiles(at_us):
                covering.setdefault((window.tile_s, start), []).append(cover)
    tiles = sorted(covering)
    layout = ReadLayout(tuple(tiles), tuple(tuple(covering[t]) for t in tiles), tuple(features))
    if len(_LAYOUTS) >= 256:  # one entry per aggregation group and moment: the old moments go
        _LAYOUTS.clear()
    _LAYOUTS[key] = (aggregations, layout)
    return layout


def layout_values(layout: ReadLayout, partials: Sequence[Partials | None]) -> dict[str, Any]:
    """Feature -> value from one entity's tiles, `partials[i]` for `layout.tiles[i]` (None: no such tile)."""
    states: dict[str, Any] = {}
    for i, tile in enumerate(partials):
        if tile is None:
            continue
        for feature, name, function in layout.covers[i]:
            partial = tile.get(name)
            if partial is not None:
                prior = states.get(feature)
                states[feature] = partial if prior is None else MERGE[function](prior, partial)
    return {feature: finish(function, states.get(feature)) for feature, function in layout.features}


def window_values(
    aggregations: Sequence[Aggregation], tiles: Mapping[tuple[int, int], Partials], at_us: int
) -> dict[str, Any]:
    """Feature -> value at `at_us` from one entity's tiles ((tile size, start) -> partials); None: no value."""
    layout = read_layout(aggregations, at_us)
    return layout_values(layout, [tiles.get(t) for t in layout.tiles])


def tiles_needed(aggregations: Sequence[Aggregation], at_us: int) -> set[tuple[int, int]]:
    """The (tile size, start) of every tile a read at `at_us` merges: what a store fetches for one entity."""
    return set(read_layout(aggregations, at_us).tiles)


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
) -> tuple[dict[str, str], list[TileKey], Callable[[set[str], Mapping[TileKey, bytes]], dict[TileKey, bytes]]]:
    """A batch as a tile store's `apply` takes it: its event ids (to their entities), every tile it touches, and
    the fold that merges
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

    return {i: e.entity for i, e in by_id.items()}, list(everything), fold_new
