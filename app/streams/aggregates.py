"""Partial aggregates: what a tile keeps of its events for each aggregation, how two partials merge, and the
value a window's merged partial serves.

Each partial is a small plain value (an int, a float, a short list) so any backend stores it as MessagePack, and
`MERGE` is associative and commutative, so tiles merge in any order, a batch can be pre-aggregated before it is
stored, and a store may merge a new partial into an old one atomically (Lua, one SQL statement) without knowing
the function. An empty window serves 0 for count, sum and count_distinct (no orders in the last hour is a fact)
and no value (the default, MISSING) for mean, min, max and last.

count_distinct is a HyperLogLog of 2^12 registers over a 64-bit BLAKE2b hash of the value: standard error
1.04 / sqrt(4096) = 1.6%; below 2.5 x 4096 distinct values it is linear counting (errors of about 1% at a thousand
values, under one value at a few dozen), and above that the raw estimator, without bias correction (a few percent
high around 10,000). Registers are kept sparse ({index: rank}), so a tile of a handful
of values costs a handful of pairs, not 4 KB.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any


class Function(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    LAST = "last"
    COUNT_DISTINCT = "count_distinct"


NUMERIC = frozenset({Function.SUM, Function.MEAN, Function.MIN, Function.MAX})  # need an int64/float64 field
EMPTY_IS_ZERO = frozenset({Function.COUNT, Function.SUM, Function.COUNT_DISTINCT})

HLL_P = 12
HLL_M = 1 << HLL_P
_HLL_REST = 64 - HLL_P
_HLL_ALPHA = 0.7213 / (1 + 1.079 / HLL_M)
HLL_STANDARD_ERROR = 1.04 / math.sqrt(HLL_M)


def hll_position(value: Any) -> tuple[int, int]:
    """The register a value lands in and its rank (1 + leading zeros of the rest of its hash)."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "big")
    rest = h & ((1 << _HLL_REST) - 1)
    return h >> _HLL_REST, _HLL_REST - rest.bit_length() + 1


def hll_estimate(registers: dict[int, int]) -> int:
    zeros = HLL_M - len(registers)
    if zeros:
        small = HLL_M * math.log(HLL_M / zeros)
        if small <= 2.5 * HLL_M:
            return round(small)
    total = zeros + math.fsum(2.0**-rank for rank in registers.values())
    return round(_HLL_ALPHA * HLL_M * HLL_M / total)


# -- one event into a partial (None: the partial of no events) -----------------------------------------------


def _add_count(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    return (state or 0) + 1


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _total(a: Any, b: Any) -> Any:
    """a + b; an integer sum past int64 goes on as a float, which every store can hold (MessagePack cannot hold
    an integer past 64 bits, and a tile that cannot be stored would fail every batch after it)."""
    total = a + b
    if type(total) is int and not _INT64_MIN <= total <= _INT64_MAX:
        return float(total)
    return total


def _add_sum(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    return value if state is None else _total(state, value)


def _add_mean(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    return [value, 1] if state is None else [_total(state[0], value), state[1] + 1]


def _add_min(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    return value if state is None or value < state else state


def _add_max(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    return value if state is None or value > state else state


def _add_last(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    candidate = [event_us, event_id, value]
    return candidate if state is None or (event_us, event_id) > (state[0], state[1]) else state


def _add_distinct(state: Any, event_us: int, event_id: str, value: Any) -> Any:
    """`value` is the event's value's HLL position (`hll_position`, see PREPARE): hashed once per event, however
    many tiles it goes into."""
    registers: dict[int, int] = {} if state is None else state
    index, rank = value
    if rank > registers.get(index, 0):
        registers[index] = rank
    return registers


# -- two partials into one ------------------------------------------------------------------------------------


def _merge_sum(a: Any, b: Any) -> Any:
    return _total(a, b)


def _merge_mean(a: Any, b: Any) -> Any:
    return [_total(a[0], b[0]), a[1] + b[1]]


def _merge_min(a: Any, b: Any) -> Any:
    return b if b < a else a


def _merge_max(a: Any, b: Any) -> Any:
    return b if b > a else a


def _merge_last(a: Any, b: Any) -> Any:
    return b if (b[0], b[1]) > (a[0], a[1]) else a


def _merge_distinct(a: Any, b: Any) -> Any:
    merged = dict(a)
    for index, rank in b.items():
        if rank > merged.get(index, 0):
            merged[index] = rank
    return merged


ADD: dict[Function, Callable[[Any, int, str, Any], Any]] = {
    Function.COUNT: _add_count,
    Function.SUM: _add_sum,
    Function.MEAN: _add_mean,
    Function.MIN: _add_min,
    Function.MAX: _add_max,
    Function.LAST: _add_last,
    Function.COUNT_DISTINCT: _add_distinct,
}
# What an event's field value becomes before it is added (once per event, not once per tile it goes into)
PREPARE: dict[Function, Callable[[Any], Any]] = {Function.COUNT_DISTINCT: hll_position}
MERGE: dict[Function, Callable[[Any, Any], Any]] = {
    Function.COUNT: _merge_sum,
    Function.SUM: _merge_sum,
    Function.MEAN: _merge_mean,
    Function.MIN: _merge_min,
    Function.MAX: _merge_max,
    Function.LAST: _merge_last,
    Function.COUNT_DISTINCT: _merge_distinct,
}


def finish(function: Function, state: Any) -> Any:
    """The value a window's merged partial serves; None: no value (the window had no events)."""
    if state is None:
        return 0 if function in EMPTY_IS_ZERO else None
    if function is Function.MEAN:
        return state[0] / state[1]
    if function is Function.LAST:
        return state[2]
    if function is Function.COUNT_DISTINCT:
        return hll_estimate(state)
    return state
