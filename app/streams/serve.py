"""Serving an aggregation group's features: its tiles read for each entity, merged into windows at the time of
the request (the rule in windows.py), one cell per entity as for any stored group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from app.serving.statuses import MISSING, PRESENT, Cell
from app.streams.tiles import decode_partials, layout_values, read_layout

if TYPE_CHECKING:
    from app.serving.plan import GroupPlan
    from backends.base import TileStore


def _served(value: Any, kind: str) -> Any:
    return float(value) if kind == "float64" and type(value) is int else value  # an empty sum is 0


async def read_windows(store: TileStore, plan: GroupPlan, keys: Sequence[str], now_us: int) -> list[Cell]:
    """One cell per key: the plan's features of its windows at `now_us`. A value a window has none of (a mean, a
    min, a last of no events) is its default, MISSING; counts and sums of no events are 0 and PRESENT."""
    group = plan.group
    streaming = group.streaming
    assert streaming is not None
    layout = read_layout(streaming.aggregations, now_us)
    needed = layout.tiles
    blobs = await store.read_tiles(group.name, keys, needed)
    features = [group.by_index[p] for p in plan.positions]
    cells = []
    width = len(needed)
    for k in range(len(keys)):
        found = [None if b is None else decode_partials(b) for b in blobs[k * width : (k + 1) * width]]
        cells.append(_cell(plan, features, layout_values(layout, found)))
    return cells


def _cell(plan: GroupPlan, features: Sequence[Any], values: Mapping[str, Any]) -> Cell:
    served, statuses = [], []
    for feature, default in zip(features, plan.defaults, strict=True):
        value = values[feature.name]
        if value is None:
            served.append(default)
            statuses.append(MISSING)
        else:
            served.append(_served(value, feature.dtype.kind))
            statuses.append(PRESENT)
    if PRESENT not in statuses:
        return plan.missing  # the shared cell: usage counts it by identity
    return Cell(tuple(served), tuple(statuses), None)
