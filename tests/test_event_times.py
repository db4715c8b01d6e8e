"""Event times: strict RFC 3339, microseconds at most, and never far ahead of the gateway's clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.loading.load import open_load, run_load
from app.registry.load import parse_registry
from app.serving.limits import Limits
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names


def history(at: str, orders: int = 1) -> dict[str, Any]:
    return {"consumer_id": 1, "lifetime_orders": orders, "lifetime_value": 1.0, "event_timestamp": at}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def post_rows(client: httpx.AsyncClient, *rows: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/features/write", json={"group": "history", "rows": list(rows)})


async def served(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post(
        "/v1/features/fetch",
        json={"entities": {"consumer_id": [1]}, "features": ["history:lifetime_orders"], "include_timestamps": True},
    )
    row: dict[str, Any] = response.json()["rows"][0]
    return row


async def test_an_event_time_past_the_bound_is_refused_naming_its_row(gateway: GatewayFactory, names: Names) -> None:
    """A year ahead used to be stored, and froze the entity: every real write after it was skipped as stale."""
    now = datetime.now(UTC)
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        year_ahead = await post_rows(
            client, history(iso(now - timedelta(minutes=1))), history(iso(now + timedelta(days=365)))
        )
        six_minutes = await post_rows(client, history(iso(now + timedelta(minutes=6))))
        four_minutes = await post_rows(client, history(iso(now + timedelta(minutes=4)), orders=4))
        after = await served(client)
    assert year_ahead.status_code == 422
    assert year_ahead.json()["field"] == "rows[1].event_timestamp"
    assert "ahead of the gateway's clock" in year_ahead.json()["detail"]
    assert "at most 5 min ahead" in year_ahead.json()["detail"]
    assert six_minutes.status_code == 422
    assert six_minutes.json()["field"] == "rows[0].event_timestamp"
    assert four_minutes.status_code == 200  # within the margin for clock drift
    assert after["values"] == [4]  # nothing of the refused batches was written


async def test_the_bound_is_a_setting(gateway: GatewayFactory, names: Names) -> None:
    ahead = iso(datetime.now(UTC) + timedelta(minutes=30))
    async with gateway(names.registry(names.backend("sqlite")), max_future_event_ms=3_600_000) as client:
        accepted = await post_rows(client, history(ahead))
    async with gateway(names.registry(names.backend("sqlite")), max_future_event_ms=0) as client:
        refused = await post_rows(client, history(iso(datetime.now(UTC) + timedelta(seconds=5))))
    assert accepted.status_code == 200
    assert refused.status_code == 422


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30",  # a date without a time
        "2026-W48",  # a week date
        "2026-W48-1T10:00:00Z",
        "2026-11-30T10:00:00",  # no offset: which zone?
        "2026-11-30T10:00Z",  # no seconds
        "2026-11-30T10:00:00.Z",
        "20261130T100000Z",  # ISO 8601 basic format
        "2026-11-30T10:00:00+0100",
        "2026-11-30T10:00:00+24:00",
        "2026-11-30T24:00:00Z",
        "2026-11-30T10:00:60Z",  # a leap second: no datetime can hold it
        "2026-02-30T10:00:00Z",
        " 2026-11-30T10:00:00Z",
        "2026-11-30T10:00:00Z\n",
        "２０２６-11-30T10:00:00Z",  # full-width digits (str.isdigit says yes)
    ],
)
async def test_text_that_is_not_strict_rfc_3339_is_refused(gateway: GatewayFactory, names: Names, text: str) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await post_rows(client, history(text))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "rows[0].event_timestamp"


async def test_digits_past_the_microsecond_are_refused_not_cut(gateway: GatewayFactory, names: Names) -> None:
    """`.0000001Z` used to be cut to `.000000Z` and so lose to, or replace, `.0000009Z`."""
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        first = await post_rows(client, history("2026-11-30T10:00:00.0000009Z", orders=9))
        second = await post_rows(client, history("2026-11-30T10:00:00.0000001Z", orders=1))
        zeros = await post_rows(client, history("2026-11-30T10:00:00.123456000Z", orders=3))
        row = await served(client)
    assert first.status_code == second.status_code == 422
    assert "more precise than a microsecond" in first.json()["detail"]
    assert zeros.status_code == 200  # trailing zeros lose nothing
    assert row["event_timestamps"] == ["2026-11-30T10:00:00.123456Z"]


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2026-11-30T10:00:00Z", "2026-11-30T10:00:00Z"),
        ("2026-11-30t10:00:00z", "2026-11-30T10:00:00Z"),
        ("2026-11-30 10:00:00+00:00", "2026-11-30T10:00:00Z"),  # RFC 3339's note allows the space
        ("2026-11-30T11:30:00.5+01:30", "2026-11-30T10:00:00.500000Z"),
        ("2026-11-30T05:00:00-05:00", "2026-11-30T10:00:00Z"),
        ("2026-11-30T10:00:00-00:00", "2026-11-30T10:00:00Z"),
    ],
)
async def test_rfc_3339_forms_are_accepted(gateway: GatewayFactory, names: Names, text: str, stored: str) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await post_rows(client, history(text))
        row = await served(client)
    assert response.status_code == 200, response.text
    assert row["event_timestamps"] == [stored]


async def test_the_error_states_the_real_bounds(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(names.registry(names.backend("sqlite")), max_future_event_ms=1e15) as client:
        response = await post_rows(client, history("9999-12-30T00:00:00.000001Z"))
        edge = await post_rows(client, history("9999-12-30T00:00:00Z"))
    assert response.status_code == 422
    assert "between 0001-01-02T00:00:00Z and 9999-12-30T00:00:00Z inclusive" in response.json()["detail"]
    assert edge.status_code == 200


async def test_feast_writes_keep_their_naive_utc_times(gateway: GatewayFactory, names: Names) -> None:
    """Feast's remote store sends naive UTC isoformat() times: that is its convention, so they read as UTC."""
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=250000)
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post(
            "/write-to-online-store",
            json={
                "feature_view_name": "history",
                "df": {
                    "consumer_id": [1],
                    "lifetime_orders": [5],
                    "lifetime_value": [1.0],
                    "event_timestamp": [now.isoformat()],
                },
            },
        )
        ahead = await client.post(
            "/write-to-online-store",
            json={
                "feature_view_name": "history",
                "df": {
                    "consumer_id": [1],
                    "lifetime_orders": [6],
                    "lifetime_value": [1.0],
                    "event_timestamp": [(now + timedelta(days=1)).isoformat()],
                },
            },
        )
        row = await served(client)
    assert response.status_code == 200, response.text
    assert row["event_timestamps"] == [now.isoformat() + "Z"]
    assert ahead.status_code == 422


async def test_materialize_rejects_rows_ahead_of_the_clock(names: Names, tmp_path: Path) -> None:
    registry = parse_registry(names.registry(names.backend("sqlite")))
    now = datetime.now(UTC)
    path = tmp_path / "history.jsonl"
    rows = [history(iso(now)), {**history(iso(now + timedelta(days=2))), "consumer_id": 2}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = await run_load(open_load(registry, "history", path, limits=Limits()))
    assert (report.written, report.rejected) == (1, 1)
    assert report.reasons[0].startswith("row 2 (line 2): event_timestamp:")
    assert "ahead of the gateway's clock" in report.reasons[0]
