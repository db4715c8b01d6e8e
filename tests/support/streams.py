"""What the stream tests share: aggregations over three windows, random arrivals of events (out of order, resent,
late, on tile edges), ingestion as the gateway does it, and a brute-force recomputation to compare with."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from app.streams.aggregates import HLL_STANDARD_ERROR, Function
from app.streams.tiles import Aggregation, Event
from app.streams.windows import Window, is_late

S = 1_000_000
LATENESS = 300 * S
WINDOWS = (Window.of("1m", 60), Window.of("10m", 600), Window.of("1h", 3600))
AGGREGATIONS = [
    Aggregation("n", Function.COUNT, None, WINDOWS),
    Aggregation("total", Function.SUM, "value", WINDOWS),
    Aggregation("avg", Function.MEAN, "value", WINDOWS[1:]),
    Aggregation("low", Function.MIN, "value", WINDOWS[:1]),
    Aggregation("high", Function.MAX, "value", WINDOWS),
    Aggregation("latest", Function.LAST, "value", WINDOWS),
    Aggregation("kinds", Function.COUNT_DISTINCT, "kind", WINDOWS),
]
BY_NAME = {a.name: a for a in AGGREGATIONS}


arrivals = st.lists(
    st.tuples(
        st.integers(0, 199),  # event id (repeats are re-sends)
        st.sampled_from(["a", "b", "c"]),  # entity
        st.one_of(  # event time: anywhere in two hours, or on a tile edge of each window
            st.integers(0, 7200 * S),
            st.integers(0, 120).map(lambda k: k * 60 * S - st_edge(k)),
        ),
        st.integers(-5 * S, 400 * S),  # arrival delay: a clock a little ahead, in time, or past the lateness
        st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), st.integers(-1000, 1000)),
        st.sampled_from(["thai", "sushi", "pizza", "tacos", "ramen", "pho"]),
    ),
    max_size=120,
)


def st_edge(k: int) -> int:
    return k % 2  # the last microsecond of a tile or the first of the next


def brute_force(function: Function, events: list[tuple[str, int, Any, str]]) -> Any:
    values = [v for _, _, v, _ in events if v is not None]
    if function is Function.COUNT:
        return len(events)
    if function is Function.SUM:
        return math.fsum(values)
    if function is Function.COUNT_DISTINCT:
        return len({k for *_, k in events})
    if not values:
        return None
    if function is Function.MEAN:
        return math.fsum(values) / len(values)
    if function is Function.MIN:
        return min(values)
    if function is Function.MAX:
        return max(values)
    return max((e, i, v) for i, e, v, _ in events if v is not None)[2]  # LAST: latest event time, then event id


def check(function: Function, got: Any, expected: Any, events: list[Any]) -> None:
    if function is Function.COUNT_DISTINCT:
        assert abs(got - expected) <= max(2, 3 * HLL_STANDARD_ERROR * expected), (got, expected)
    elif expected is None or function in (Function.COUNT, Function.MIN, Function.MAX, Function.LAST):
        assert got == expected, (function, got, expected, events)
    else:  # sums of floats in another order: equal within rounding
        scale = max(1.0, math.fsum(abs(v) for _, _, v, _ in events if v is not None))
        assert abs(got - expected) <= 1e-9 * scale, (function, got, expected)


Arrival = tuple[int, str, int, int, Any, str]  # (id, entity, event time offset, delay, value, kind)


def ingest_in_batches(
    events: list[Arrival], base_us: int, batch: int, apply: Callable[[list[Event]], None]
) -> tuple[dict[str, tuple[str, int, Any, str]], int, int]:
    """What ingestion does, in arrival order: late events dropped, ids seen before dropped, the rest handed to
    `apply` in batches. Answers the accepted events by id, and the late and duplicate counts."""
    arriving = sorted(
        (
            (base_us + t + delay, f"e{i}", entity, base_us + t, value, kind)
            for i, entity, t, delay, value, kind in events
        ),
        key=lambda e: e[0],
    )
    seen: set[str] = set()
    accepted: dict[str, tuple[str, int, Any, str]] = {}
    late = duplicates = 0
    for first in range(0, len(arriving), batch):
        fresh = []
        for now, event_id, entity, event_us, value, kind in arriving[first : first + batch]:
            if is_late(event_us, now, LATENESS):
                late += 1
                continue
            if event_id in seen:
                duplicates += 1
                continue
            seen.add(event_id)
            accepted[event_id] = (entity, event_us, value, kind)
            fresh.append(Event(event_id, entity, event_us, {"value": value, "kind": kind}))
        apply(fresh)
    return accepted, late, duplicates


def compare(entity: str, served: dict[str, Any], at_us: int, accepted: dict[str, tuple[str, int, Any, str]]) -> None:
    """Every served value of `entity` at `at_us` against the recomputation from the accepted events."""
    mine = [(event_id, *rest[1:]) for event_id, rest in accepted.items() if rest[0] == entity]
    for aggregation in AGGREGATIONS:
        for window in aggregation.windows:
            inside = [(i, e, v, k) for i, e, v, k in mine if window.counts(at_us, e)]
            check(
                aggregation.function,
                served[f"{aggregation.name}_{window.name}"],
                brute_force(aggregation.function, inside),
                inside,
            )
