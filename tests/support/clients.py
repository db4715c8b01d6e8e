"""Talking to the gateway as a client does: rows to write, `write` and `fetch` that insist on a 200, and its
Prometheus metrics read back as numbers."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

JSON = {"content-type": "application/json"}  # for requests that send raw bytes (httpx's json= sets it itself)


def stamp(delta: timedelta = timedelta()) -> str:
    """An RFC 3339 event time, now (+ `delta`)."""
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


def live_row(consumer: int, orders: int, *, at: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A row of the `live` group (see `registries.FEATURES`), every value derived from `consumer` and `orders`."""
    row = {
        "consumer_id": consumer,
        "event_timestamp": at or stamp(),
        "orders_7d": orders,
        "avg_basket": orders * 1.5,
        "active": orders % 2 == 1,
        "name": f"consumer {consumer} ✓",
        "raw": base64.b64encode(bytes([consumer % 256, 0, 255])).decode(),
        "embedding": [0.25, -1.5, float(orders)],
        "ids": [consumer, -consumer],
    }
    row.update(overrides)
    return row


async def write(client: httpx.AsyncClient, group: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    response = await client.post("/v1/features/write", json={"group": group, "rows": rows})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def fetch(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/features/fetch", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>[0-9.e+-]+|\+Inf)$")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A Prometheus text exposition as {(name, labels): value}, asserting that every line is a sample."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def metric_value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The gateway's sample `feature_gateway_<name>{labels}` (exactly those labels)."""
    return samples[(f"feature_gateway_{name}", frozenset(labels.items()))]
