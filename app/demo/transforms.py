"""The demo registry's on-demand feature: called once per request with whole columns (see app/serving/transforms.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def basket_ratio(columns: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    averages = columns["consumer_live:avg_basket"]
    baskets = columns["request:basket_value"]
    return {"basket_ratio": [b / a if a else 1.0 for a, b in zip(averages, baskets, strict=True)]}
