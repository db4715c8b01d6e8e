"""Prometheus metrics and feature-usage insight: what was asked, and how often it was a default."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

import app.serving.gateway
from app.metrics import Metrics
from app.serving.statuses import Outcome
from tests.support.clients import fetch, live_row, metric_value, parse_metrics, stamp, write
from tests.support.faults import closed_backend
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names


async def test_usage_counts_every_status_per_feature(gateway: GatewayFactory, names: Names) -> None:
    registry = names.registry(names.backend("sqlite"), closed_backend("redis", names))
    async with gateway(registry) as client:
        await write(
            client,
            "live",
            [live_row(1, 1), live_row(2, 2, at=stamp(-timedelta(minutes=90))), live_row(3, 3, embedding=None)],
        )
        await write(client, "live", [live_row(1, 0, at=stamp(-timedelta(hours=3)))])  # older: skipped as stale
        for _ in range(2):
            await fetch(
                client,
                entities={"consumer_id": [1, 2, 3, 4]},
                features=["live:orders_7d", "live:embedding", "history:lifetime_orders"],
            )
        await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
        usage = (await client.get("/v1/usage")).json()
        text = (await client.get("/metrics")).text
    orders = usage["groups"]["live"]["features"]["orders_7d"]
    assert orders["requests"] == 3
    assert orders["values"] == 9
    assert orders["statuses"] == {"PRESENT": 5, "MISSING": 2, "EXPIRED": 2, "UNAVAILABLE": 0}
    assert orders["default_rate"] == round(4 / 9, 4)
    embedding = usage["groups"]["live"]["features"]["embedding"]
    # consumer 3 wrote a null embedding: its row is PRESENT, that value is MISSING (served as the default)
    assert embedding["statuses"] == {"PRESENT": 2, "MISSING": 4, "EXPIRED": 2, "UNAVAILABLE": 0}
    history = usage["groups"]["history"]["features"]["lifetime_orders"]
    assert history["statuses"]["UNAVAILABLE"] == 8
    assert history["default_rate"] == 1.0
    assert "live:avg_basket" in usage["never_requested"]
    assert "live:orders_7d" not in usage["never_requested"]
    writes = usage["groups"]["live"]["writes"]
    assert (writes["rows"], writes["skipped_stale"], writes["rejected"]) == (3, 1, 0)
    assert list(writes["via"]) == ["api"]
    assert writes["last_at"] is not None
    assert usage["groups"]["history"]["writes"] == {
        "rows": 0,
        "skipped_stale": 0,
        "rejected": 0,
        "last_at": None,
        "via": {},
    }

    samples = parse_metrics(text)
    assert metric_value(samples, "feature_requests_total", group="live", feature="orders_7d") == 3
    assert metric_value(samples, "feature_values_total", group="live", feature="embedding", status="MISSING") == 4
    assert metric_value(samples, "rows_written_total", group="live", via="api", outcome="written") == 3
    assert metric_value(samples, "rows_written_total", group="live", via="api", outcome="skipped_stale") == 1
    assert metric_value(samples, "backend_reads_total", backend="bulk", outcome="error") == 2
    assert metric_value(samples, "backend_reads_total", backend="hot", outcome="ok") == 3
    assert metric_value(samples, "backend_circuit_state", backend="hot", direction="read", state="closed") == 1
    assert metric_value(samples, "backend_circuit_state", backend="hot", direction="write", state="closed") == 1
    assert metric_value(samples, "http_requests_total", route="/v1/features/fetch", method="POST", status="200") == 3
    assert metric_value(samples, "backend_read_duration_seconds_count", backend="hot") == 3
    buckets = [
        v
        for (n, labels), v in samples.items()
        if n == "feature_gateway_backend_read_duration_seconds_bucket" and ("backend", "hot") in labels
    ]
    assert buckets == sorted(buckets)  # cumulative


async def test_usage_stays_exact_when_plans_leave_the_cache(
    gateway: GatewayFactory, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.serving.gateway, "_PLAN_CACHE_SIZE", 2)  # every new feature list evicts an older plan
    orders = [
        ["live:orders_7d", "live:avg_basket"],
        ["live:avg_basket", "live:orders_7d"],
        ["live:orders_7d"],
        ["live:avg_basket", "live:orders_7d", "live:orders_7d"],
    ]
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        await write(client, "live", [live_row(1, 1)])
        for features in orders * 3:
            # A generous deadline: this is about counting, and a slow first SQLite read would be UNAVAILABLE
            await fetch(client, entities={"consumer_id": [1, 2]}, features=features, deadline_ms=5000)
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        usage = (await client.get("/v1/usage")).json()["groups"]["live"]["features"]
        cached = len(gw._plans)
    assert cached <= 2
    # orders_7d is asked 1 + 1 + 1 + 2 times per round (twice in the last list), 3 rounds, 2 rows each
    assert usage["orders_7d"]["values"] == 5 * 3 * 2
    assert usage["orders_7d"]["statuses"]["PRESENT"] == 5 * 3
    assert usage["avg_basket"]["values"] == 3 * 3 * 2


async def test_strict_failures_are_counted(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"), closed_backend("redis", names))) as client:
        strict = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1]}, "features": ["history:lifetime_orders"], "strict": True},
        )
        metrics = (await client.get("/metrics")).text
    assert strict.status_code == 503
    assert 'feature_gateway_backend_reads_total{backend="bulk",outcome="error"} 1' in metrics


async def test_unknown_paths_share_one_route_label(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        for i in range(3):
            await client.get(f"/no/such/path/{i}")
        samples = parse_metrics((await client.get("/metrics")).text)
    assert metric_value(samples, "http_requests_total", route="other", method="GET", status="404") == 3


def test_workers_snapshots_are_merged(tmp_path: Path) -> None:
    first, second = Metrics(str(tmp_path)), Metrics(str(tmp_path))
    first.backend_read("hot", Outcome.OK, 1.5)
    first.features[("live", 0)].present += 4
    first.dump()
    second.backend_read("hot", Outcome.TIMEOUT, 50.0)
    second.features[("live", 0)].present += 6
    # `second` is another process in production; here it has the same pid, so rename first's snapshot.
    (tmp_path / next(p.name for p in tmp_path.glob("*.json"))).rename(tmp_path / "12345.json")
    merged = second.merged()
    assert merged.backend_outcomes[("hot", "ok")] == 1
    assert merged.backend_outcomes[("hot", "timeout")] == 1
    assert sum(merged.backend_latency["hot"].counts) == 2
    assert merged.feature_usage()[("live", 0)].present == 10


async def test_requests_are_counted_by_the_spec_paths_without_generating_the_spec(
    gateway: GatewayFactory, names: Names
) -> None:
    """Generating the spec costs 0.2-0.4 s of CPU with the event loop held: a worker's first request must not."""
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        await fetch(client, entities={"consumer_id": [1]}, features=["live:orders_7d"])
        await client.get("/v1/registry")
        await client.get("/v1/services/nobody")
        generated = client.app.openapi_schema  # type: ignore[attr-defined]
        labels = client.app.state.route_labels  # type: ignore[attr-defined]
        spec = client.app.openapi()  # type: ignore[attr-defined]
        samples = parse_metrics((await client.get("/metrics")).text)
    assert generated is None
    assert labels == {*spec["paths"], "/", "/docs", "/openapi.json"}
    assert metric_value(samples, "http_requests_total", route="/v1/features/fetch", method="POST", status="200") == 1
    assert metric_value(samples, "http_requests_total", route="/v1/registry", method="GET", status="200") == 1
    assert metric_value(samples, "http_requests_total", route="other", method="GET", status="404") == 1
