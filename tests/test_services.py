"""Serving per model: feature services (defaults, max_age, order), on-demand features, and their errors."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from app.auth import key_entry, new_token
from app.errors import RegistryError
from app.registry.load import load_registry, parse_registry
from tests.support import transforms
from tests.support.clients import fetch, live_row, stamp, write
from tests.support.faults import postgres_table_locked
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

MODELS = """
on_demand:
  ratio:
    function: "tests.support.transforms:ratio"
    inputs: ["live:avg_basket", "request:basket"]
    request: {basket: float64}
    outputs:
      ratio: {dtype: float64, default: 1.0}
      big: {dtype: bool, default: false}
  boom:
    function: "tests.support.transforms:boom"
    inputs: ["live:orders_7d"]
    outputs: {boom: {dtype: int64, default: -7}}
  short:
    function: "tests.support.transforms:short"
    inputs: ["live:orders_7d"]
    outputs: {short: {dtype: int64, default: -8}}
  wrong:
    function: "tests.support.transforms:wrong"
    inputs: ["live:orders_7d"]
    outputs: {wrong: {dtype: int64, default: -9}}
  counted:
    function: "tests.support.transforms:counted"
    inputs: ["live:orders_7d"]
    outputs: {doubled: {dtype: int64}}
  scalars:
    function: "tests.support.transforms:scalars"
    inputs: ["live:orders_7d"]
    outputs: {half: {dtype: float64, default: -1.0}}
services:
  strict_model:
    description: trained with 1 for a missing count, no live value older than 10 minutes
    features: ["live:orders_7d", "live:avg_basket", "history:*"]
    defaults: {"live:orders_7d": 1}
    max_age: {live: 10m}
    deadline_ms: 500
  lenient_model:
    features: ["history:lifetime_orders", "live:orders_7d"]
  feature_age:
    features: ["live:orders_7d", "live:avg_basket"]
    max_age: {"live:orders_7d": 10m, live: 1h}
  with_ratio:
    features: ["ratio:ratio", "live:orders_7d"]
    defaults: {"ratio:ratio": 0.0, "live:avg_basket": 2.0}
"""


def registry(names: Names, kind: str = "sqlite") -> str:
    return names.registry(names.backend(kind)) + MODELS


def column(answer: dict[str, Any], ref: str, what: str = "values") -> list[Any]:
    at = answer["features"].index(ref)
    return [row[what][at] for row in answer["rows"]]


async def test_two_models_over_the_same_value_answer_differently(
    gateway: GatewayFactory, names: Names, kind: str
) -> None:
    async with gateway(registry(names, kind)) as client:
        await write(client, "live", [live_row(1, 10, at=stamp(-timedelta(minutes=20)))])
        await write(
            client,
            "history",
            [{"consumer_id": 1, "event_timestamp": stamp(), "lifetime_orders": 40, "lifetime_value": None}],
        )
        ids = {"consumer_id": [1, 2]}
        strict = await fetch(client, service="strict_model", entities=ids)
        lenient = await fetch(client, service="lenient_model", entities=ids)
        by_feature = await fetch(client, service="feature_age", entities=ids)
    # The service's order, `history:*` expanded
    assert strict["features"] == [
        "live:orders_7d",
        "live:avg_basket",
        "history:lifetime_orders",
        "history:lifetime_value",
    ]
    assert strict["service"] == "strict_model"
    # 20 minutes old: past strict_model's 10 minute max_age (EXPIRED, its own default 1), inside the group's 1 h
    assert strict["rows"][0]["values"][:3] == [1, 0.5, 40]
    assert strict["rows"][0]["statuses"][:3] == ["EXPIRED", "EXPIRED", "PRESENT"]
    assert strict["rows"][1]["values"][:3] == [1, 0.5, -1]  # never written: MISSING, its default still 1
    assert strict["rows"][1]["statuses"][:3] == ["MISSING"] * 3
    assert lenient["features"] == ["history:lifetime_orders", "live:orders_7d"]
    assert lenient["rows"][0]["values"] == [40, 10]
    assert lenient["rows"][0]["statuses"] == ["PRESENT", "PRESENT"]
    assert lenient["rows"][1]["values"] == [-1, 0]  # the group's default
    # A feature's own max_age wins over its group's: orders_7d is EXPIRED (its group default 0), avg_basket not
    assert by_feature["rows"][0]["values"] == [0, 15.0]
    assert by_feature["rows"][0]["statuses"] == ["EXPIRED", "PRESENT"]


async def test_on_demand_features_from_context_and_stored_values(gateway: GatewayFactory, names: Names) -> None:
    exporter = InMemorySpanExporter()
    async with gateway(registry(names), exporter=exporter) as client:
        await write(client, "live", [live_row(1, 10), live_row(3, 4, at=stamp(-timedelta(minutes=90)))])
        exporter.clear()
        transforms.CALLS.clear()
        response = await client.post(
            "/v1/features/fetch",
            json={
                "features": ["ratio", "boom", "short", "wrong", "counted", "scalars", "live:orders_7d"],
                "entities": {"consumer_id": [1, 2, 3]},
                "context": {"basket": [30.0, 10, 12.0]},
            },
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["features"] == [
        "ratio:ratio",
        "ratio:big",
        "boom:boom",
        "short:short",
        "wrong:wrong",
        "counted:doubled",
        "scalars:half",
        "live:orders_7d",
    ]
    # 1: 30 / 15.0 (avg_basket = 1.5 x orders). 2: MISSING, so computed from the default 0.5, and MISSING itself.
    # 3: EXPIRED (90 minutes, ttl 1 h), computed from the default too, and EXPIRED.
    assert column(answer, "ratio:ratio") == [2.0, 20.0, 24.0]
    assert column(answer, "ratio:ratio", "statuses") == ["PRESENT", "MISSING", "EXPIRED"]
    assert column(answer, "ratio:big") == [True, True, True]
    assert column(answer, "counted:doubled") == [20, 0, 0]
    assert transforms.CALLS == [3]  # once per request, on columns
    # numpy scalars taken as their values; NaN is no value: the default, MISSING (UNAVAILABLE inputs would win)
    assert column(answer, "scalars:half") == [5.0, -1.0, -1.0]
    assert column(answer, "scalars:half", "statuses") == ["PRESENT", "MISSING", "MISSING"]
    for name, default in (("boom:boom", -7), ("short:short", -8), ("wrong:wrong", -9)):
        assert column(answer, name) == [default] * 3
        assert column(answer, name, "statuses") == ["UNAVAILABLE"] * 3
    assert column(answer, "live:orders_7d") == [10, 0, 0]
    assert answer["degraded"] is True
    assert answer["backends"] == {"hot": {"status": "ok", "ms": answer["backends"]["hot"]["ms"]}}
    reports = answer["transforms"]
    assert reports["ratio"]["status"] == reports["counted"]["status"] == "ok"
    assert reports["boom"]["error"] == "ZeroDivisionError: the model's transform divided by zero"
    assert reports["short"]["error"] == "short: returned 1 values for 3 rows"
    assert reports["wrong"]["error"].startswith("wrong[0]: expected an integer")
    assert "transform;dur=" in response.headers["server-timing"]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["transform boom"].status.status_code is StatusCode.ERROR
    assert spans["transform ratio"].status.status_code is StatusCode.UNSET
    assert spans["transform ratio"].parent.span_id == spans["POST /v1/features/fetch"].context.span_id


async def test_a_service_with_on_demand_features_and_its_defaults(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(registry(names)) as client:
        await write(client, "live", [live_row(1, 10)])
        answer = await fetch(
            client, service="with_ratio", entities={"consumer_id": [1, 2]}, context={"basket": [30.0, 4.0]}
        )
        listed = (await client.get("/v1/services")).json()
        one = await client.get("/v1/services/with_ratio")
        unknown = await client.get("/v1/services/nope")
    assert answer["features"] == ["ratio:ratio", "live:orders_7d"]
    # 2 is MISSING: the transform gets the service's default for its input (2.0), so 4.0 / 2.0
    assert [r["values"] for r in answer["rows"]] == [[2.0, 10], [2.0, 0]]
    assert [r["statuses"] for r in answer["rows"]] == [["PRESENT", "PRESENT"], ["MISSING", "MISSING"]]
    assert [s["name"] for s in listed["services"]] == ["strict_model", "lenient_model", "feature_age", "with_ratio"]
    assert one.json()["features"] == [
        {"name": "ratio:ratio", "dtype": "float64", "default": 0.0, "max_age_seconds": None},
        {"name": "live:orders_7d", "dtype": "int64", "default": 0, "max_age_seconds": None},
    ]
    strict = next(s for s in listed["services"] if s["name"] == "strict_model")
    assert strict["deadline_ms"] == 500
    assert strict["features"][0] == {"name": "live:orders_7d", "dtype": "int64", "default": 1, "max_age_seconds": 600}
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"


async def test_a_transform_failure_never_fails_the_request(gateway: GatewayFactory, names: Names) -> None:
    """Concurrent requests with failing transforms: every one answered, every failing output UNAVAILABLE."""
    async with gateway(registry(names)) as client:
        await write(client, "live", [live_row(1, 10)])
        body = {"features": ["boom", "ratio"], "entities": {"consumer_id": [1]}, "context": {"basket": [3.0]}}
        answers = await asyncio.gather(*(client.post("/v1/features/fetch", json=body) for _ in range(20)))
    assert {a.status_code for a in answers} == {200}
    assert {tuple(a.json()["rows"][0]["values"]) for a in answers} == {(-7, 0.2, False)}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"features": ["live:orders_7d"], "service": "lenient_model"}, 422, "service"),
        ({}, 422, "features"),
        ({"service": "nope"}, 422, "service"),
        ({"service": "with_ratio"}, 422, "context.basket"),
        ({"service": "with_ratio", "context": {"basket": [1.0]}}, 422, "context.basket"),
        ({"service": "with_ratio", "context": {"basket": [1.0, "x"]}}, 422, "context.basket[1]"),
        ({"service": "with_ratio", "context": {"basket": [1.0, None]}}, 422, "context.basket[1]"),
        ({"service": "with_ratio", "context": {"basket": [1.0, 2.0], "tip": [1, 2]}}, 422, "context.tip"),
        ({"service": "lenient_model", "context": {"basket": [1.0, 2.0]}}, 422, "context.basket"),
        ({"service": "with_ratio", "context": {"basket": 3}}, 422, "context"),  # msgspec: "some key of context"
        ({"features": ["ratio:nope"]}, 422, "features[0]"),
        ({"features": ["nope"]}, 422, "features[0]"),
        ({"service": 3}, 422, "service"),
    ],
)
async def test_bad_service_and_context_bodies(
    gateway: GatewayFactory, names: Names, body: dict[str, Any], status: int, field: str
) -> None:
    async with gateway(registry(names)) as client:
        response = await client.post("/v1/features/fetch", json={"entities": {"consumer_id": [1, 2]}, **body})
        still = await client.post(
            "/v1/features/fetch", json={"entities": {"consumer_id": [1]}, "service": "lenient_model"}
        )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field
    assert still.status_code == 200


async def test_feast_feature_service_as_feast_sends_it(gateway: GatewayFactory, names: Names) -> None:
    async with gateway(registry(names)) as client:
        await write(client, "live", [live_row(1, 10)])
        # feast.feature_server: json.dumps posted as `data=`, the request source's fields among the entities
        body = json.dumps({"feature_service": "with_ratio", "entities": {"consumer_id": [1, 2], "basket": [30.0, 1.0]}})
        response = await client.post("/get-online-features", content=body.encode())
        full = await client.post(
            "/get-online-features",
            content=json.dumps(
                {"feature_service": "lenient_model", "entities": {"consumer_id": [1]}, "full_feature_names": True}
            ).encode(),
        )
        unknown = await client.post(
            "/get-online-features",
            content=json.dumps({"feature_service": "driver_activity", "entities": {"consumer_id": [1]}}).encode(),
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["metadata"]["feature_names"] == ["consumer_id", "basket", "ratio", "orders_7d"]
    assert answer["results"][2]["values"] == [2.0, 0.5]
    assert answer["results"][2]["statuses"] == ["PRESENT", "NOT_FOUND"]
    assert answer["results"][3]["values"] == [10, 0]
    assert full.json()["metadata"]["feature_names"] == ["consumer_id", "history__lifetime_orders", "live__orders_7d"]
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "feature_service"


# -- the registry: every mistake named by its path --------------------------------------------------------


def _parse(names: Names, extra: str) -> None:
    parse_registry(names.registry(names.backend("sqlite")) + extra, "test-registry", env={})


@pytest.mark.parametrize(
    ("extra", "path", "reason"),
    [
        ("services:\n  m: {features: ['live:nope']}\n", "services.m.features[0]", "unknown feature 'nope'"),
        ("services:\n  m: {features: ['nope:x']}\n", "services.m.features[0]", "unknown group 'nope'"),
        ("services:\n  m: {features: ['live:*', 'live:orders_7d']}\n", "services.m.features", "served twice"),
        (
            "services:\n  m: {features: ['live:orders_7d'], defaults: {'live:orders_7d': 1.5}}\n",
            "services.m.defaults.live:orders_7d",
            "does not fit int64",
        ),
        (
            "services:\n  m: {features: ['live:orders_7d'], defaults: {'history:lifetime_orders': 1}}\n",
            "services.m.defaults.history:lifetime_orders",
            "not a feature this service serves",
        ),
        (
            "services:\n  m: {features: ['live:orders_7d'], max_age: {live: 2h}}\n",
            "services.m.max_age.live",
            "longer than the group's ttl",
        ),
        (
            "services:\n  m: {features: ['live:orders_7d'], max_age: {history: 1h}}\n",
            "services.m.max_age.history",
            "not a group",
        ),
        ("services:\n  m: {features: ['live:orders_7d'], deadline_ms: 0}\n", "services.m.deadline_ms", "positive"),
        (
            "on_demand:\n  r: {function: 'tests.support.transforms:nope', inputs: ['live:orders_7d'],"
            " outputs: {x: int64}}\n",
            "on_demand.r.function",
            "has no function 'nope'",
        ),
        (
            "on_demand:\n  r: {function: 'no_such_module_here:f', inputs: ['live:orders_7d'], outputs: {x: int64}}\n",
            "on_demand.r.function",
            "cannot import no_such_module_here",
        ),
        (
            "on_demand:\n  r: {function: 'tests.support.transforms:boom', inputs: ['request:tip'],"
            " outputs: {x: int64}}\n",
            "on_demand.r.inputs[0]",
            "not declared",
        ),
        (
            "on_demand:\n  r: {function: 'tests.support.transforms:boom', inputs: ['live:nope'],"
            " outputs: {x: int64}}\n",
            "on_demand.r.inputs[0]",
            "expected group:feature",
        ),
        (
            "on_demand:\n  live: {function: 'tests.support.transforms:boom', inputs: ['live:orders_7d'],"
            " outputs: {x: int64}}\n",
            "on_demand.live",
            "already a group",
        ),
        (
            "on_demand:\n  r: {function: 'tests.support.transforms:boom', inputs: ['live:orders_7d'],"
            " outputs: {x: {dtype: int64, default: yes}}}\n",
            "on_demand.r.outputs.x.default",
            "does not fit int64",
        ),
    ],
)
def test_registry_errors_name_the_path(names: Names, extra: str, path: str, reason: str) -> None:
    with pytest.raises(RegistryError) as raised:
        _parse(names, extra)
    assert raised.value.field == path
    assert reason in str(raised.value)


def test_registry_errors_name_the_path_too(names: Names) -> None:
    two_dtypes = (
        "on_demand:\n"
        "  a: {function: 'tests.support.transforms:boom', inputs: ['live:orders_7d', 'request:tip'],"
        " request: {tip: float64}, outputs: {x: int64}}\n"
        "  b: {function: 'tests.support.transforms:boom', inputs: ['live:orders_7d', 'request:tip'],"
        " request: {tip: string}, outputs: {y: int64}}\n"
    )
    only_request = (
        "on_demand:\n  a: {function: 'tests.support.transforms:boom', inputs: ['request:tip'],"
        " request: {tip: float64}, outputs: {x: int64}}\n"
    )
    nan_deadline = "services:\n  m: {features: ['live:orders_7d'], deadline_ms: .nan}\n"
    for extra, path in (
        (two_dtypes, "on_demand.b.request.tip"),
        (only_request, "on_demand.a.inputs"),
        (nan_deadline, "services.m.deadline_ms"),
    ):
        with pytest.raises(RegistryError) as raised:
            _parse(names, extra)
        assert raised.value.field == path


def test_functions_import_from_the_registry_folder(names: Names, tmp_path: Path) -> None:
    module = f"model_transforms_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("def f(cols):\n    return {'x': [1] * len(cols['live:orders_7d'])}\n")
    path = tmp_path / "registry.yaml"
    extra = f"on_demand:\n  r: {{function: '{module}:f', inputs: ['live:orders_7d'], outputs: {{x: int64}}}}\n"
    path.write_text(names.registry(names.backend("sqlite")) + extra)
    loaded = load_registry(path)
    assert loaded.on_demand["r"].function({"live:orders_7d": [1, 2]}) == {"x": [1, 1]}


async def test_usage_by_service_and_key_under_concurrent_requests(gateway: GatewayFactory, names: Names) -> None:
    tokens = {name: new_token() for name in ("eta_team", "risk_team", "live_only")}
    config = json.dumps(
        [
            key_entry("eta_team", tokens["eta_team"], ["read", "write"]),
            key_entry("risk_team", tokens["risk_team"], ["read"]),
            key_entry("live_only", tokens["live_only"], ["read"], ["live"]),
        ]
    )

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    async with gateway(registry(names), api_keys=config) as client:
        written = await client.post(
            "/v1/features/write", json={"group": "live", "rows": [live_row(1, 10)]}, headers=auth("eta_team")
        )
        assert written.status_code == 200
        ids = {"consumer_id": [1, 2]}  # 1 PRESENT, 2 MISSING
        calls = [
            *(
                client.post(
                    "/v1/features/fetch", json={"service": "lenient_model", "entities": ids}, headers=auth("eta_team")
                )
                for _ in range(30)
            ),
            *(
                client.post(
                    "/v1/features/fetch", json={"service": "lenient_model", "entities": ids}, headers=auth("risk_team")
                )
                for _ in range(20)
            ),
            *(
                client.post(
                    "/v1/features/fetch",
                    json={"service": "with_ratio", "entities": ids, "context": {"basket": [1.0, 2.0]}},
                    headers=auth("risk_team"),
                )
                for _ in range(10)
            ),
            *(
                client.post(
                    "/v1/features/fetch",
                    json={"features": ["live:orders_7d"], "entities": ids},
                    headers=auth("risk_team"),
                )
                for _ in range(5)
            ),
        ]
        assert {r.status_code for r in await asyncio.gather(*calls)} == {200}
        usage = (await client.get("/v1/usage", headers=auth("risk_team"))).json()
        limited = (await client.get("/v1/usage", headers=auth("live_only"))).json()
        # A key limited to `live` cannot tell a service, view or name it may not use from one that does not exist
        refused = [
            await client.post("/v1/features/fetch", json=body, headers=auth("live_only"))
            for body in (
                {"service": "lenient_model", "entities": ids},  # reads history
                {"service": "no_such_service", "entities": ids},
                {"features": ["no_such_view"], "entities": ids},
                {"features": ["history:lifetime_orders"], "entities": ids},
            )
        ]
        hidden = [
            await client.get(f"/v1/services/{name}", headers=auth("live_only"))
            for name in ("lenient_model", "no_such_service")
        ]
        metrics = (await client.get("/metrics", headers=auth("risk_team"))).text
    services = usage["services"]
    lenient = services["lenient_model"]
    assert lenient["requests"] == 50
    # 2 features x 2 rows per request: history never written (MISSING x 2), live PRESENT for 1, MISSING for 2
    assert lenient["statuses"] == {"PRESENT": 50, "MISSING": 150, "EXPIRED": 0, "UNAVAILABLE": 0}
    assert lenient["default_rate"] == 0.75
    assert lenient["keys"]["eta_team"]["requests"] == 30
    assert lenient["keys"]["risk_team"]["statuses"]["PRESENT"] == 20
    ratio = services["with_ratio"]
    assert ratio["requests"] == 10
    assert ratio["statuses"] == {"PRESENT": 20, "MISSING": 20, "EXPIRED": 0, "UNAVAILABLE": 0}  # ratio + orders_7d
    assert services["(features)"]["requests"] == 5
    assert services["strict_model"]["requests"] == 0  # declared, never asked for
    assert "history:lifetime_value" not in usage["unused"]  # strict_model serves it
    assert "stores:open_orders" in usage["unused"]
    assert "live:name" in usage["unused"]  # no service lists it, no request asked
    assert "live:avg_basket" not in usage["unused"]  # with_ratio computes from it
    # A key limited to `live` sees only services that read nothing else, and no other key's name
    assert set(limited["services"]) == {"feature_age", "with_ratio"}
    assert limited["services"]["with_ratio"]["keys"] == {}
    assert [r.status_code for r in refused] == [403] * 4
    assert refused[0].json()["detail"] == "this API key may not use service 'lenient_model'"
    assert refused[1].json()["detail"] == "this API key may not use service 'no_such_service'"
    assert [r.status_code for r in hidden] == [404, 404]
    # Features read only as a transform's input are not counted as requested: no one asked for avg_basket
    assert usage["groups"]["live"]["features"]["avg_basket"]["requests"] == 0
    assert usage["groups"]["live"]["features"]["orders_7d"]["requests"] == 65  # lenient 50, with_ratio 10, by list 5
    assert 'feature_gateway_model_requests_total{service="lenient_model",key="eta_team"} 30' in metrics
    assert 'feature_gateway_model_values_total{service="with_ratio",key="risk_team",status="MISSING"} 20' in metrics


async def test_a_service_deadline_applies_when_the_request_gives_none(gateway: GatewayFactory, names: Names) -> None:
    # The bulk backend's own timeout and the gateway's default deadline far above anything this test waits
    bulk = names.backend("cockroach").replace("}", ", timeout_ms: 10000}")
    extra = "services:\n  quick: {features: ['history:lifetime_orders'], deadline_ms: 80}\n"
    async with gateway(names.registry(names.backend("sqlite"), bulk) + extra, default_deadline_ms=10000) as client:
        # No read of the locked table can finish inside the block: an answer inside it was cut off by a deadline
        async with postgres_table_locked(names):
            answer = await fetch(client, service="quick", entities={"consumer_id": [1]})
    assert answer["backends"]["bulk"] == {
        "status": "timeout",
        "ms": answer["backends"]["bulk"]["ms"],
        "error": "missed the deadline",
    }
    assert answer["backends"]["bulk"]["ms"] < 5000  # cut at the service's 80 ms, not at the gateway's 10 s
    assert answer["rows"][0]["statuses"] == ["UNAVAILABLE"]
    assert answer["rows"][0]["values"] == [-1]
