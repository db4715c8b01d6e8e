"""The bench registry's on-demand functions: plain Python over columns, as a model owner would write them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def basket_ratio(columns: Mapping[str, Sequence[Any]]) -> dict[str, list[float]]:
    averages, baskets = columns["live:float_00"], columns["request:basket_value"]
    return {"basket_ratio": [b / a if a else 1.0 for a, b in zip(averages, baskets, strict=True)]}


def hour_load(columns: Mapping[str, Sequence[Any]]) -> dict[str, list[int]]:
    orders, hours = columns["live:int_00"], columns["request:hour"]
    return {"hour_load": [o * (h + 1) for o, h in zip(orders, hours, strict=True)]}
