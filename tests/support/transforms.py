"""On-demand functions the tests' registries name (`tests.support.transforms:<name>`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def ratio(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Numpy columns in, numpy arrays out: the gateway takes either."""
    average = np.asarray(columns["live:avg_basket"], dtype=np.float64)
    basket = np.asarray(columns["request:basket"], dtype=np.float64)
    ratios = np.divide(basket, average, out=np.ones_like(basket), where=average != 0)
    return {"ratio": ratios, "big": ratios > 1.5}


def boom(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    raise ZeroDivisionError("the model's transform divided by zero")


def short(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    return {"short": list(columns["live:orders_7d"])[:1]}


def wrong(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    return {"wrong": [str(v) for v in columns["live:orders_7d"]]}


CALLS: list[int] = []  # rows per call of `counted`


def counted(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    orders = columns["live:orders_7d"]
    CALLS.append(len(orders))
    return {"doubled": [2 * v for v in orders]}


def scalars(columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """A list of numpy scalars, NaN where there is no value."""
    return {"half": [np.float64(v / 2) if v else np.float64("nan") for v in columns["live:orders_7d"]]}
