"""API keys: 401 vs 403, scopes, group limits, key config, the loopback rule of `serve`, and no token leaks."""

from __future__ import annotations

import hashlib
import hmac
import importlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import app.auth
from app.auth import KeyRing, hash_token, key_entry, new_token, parse_keys
from app.cli import is_loopback
from app.errors import KeyConfigError, Unauthorized
from app.main import create_app
from app.registry.load import parse_registry
from app.settings import Settings
from tests.support.clients import JSON, live_row
from tests.support.gateways import GatewayFactory
from tests.support.registries import Names
from tests.support.servers import free_port

CLI = [sys.executable, "-m", "app"]
FETCH_LIVE = {"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}
FETCH_HISTORY = {"entities": {"consumer_id": [1]}, "features": ["history:lifetime_orders"]}


def history_row(consumer: int) -> dict[str, Any]:
    return {"consumer_id": consumer, "lifetime_orders": 7, "lifetime_value": 70.5}


class Keys:
    """Tokens made the way `keys new` makes them, and the JSON config that admits them."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.entries: list[dict[str, Any]] = []

    def add(self, name: str, *scopes: str, groups: tuple[str, ...] = ()) -> str:
        token = new_token()
        self.tokens[name] = token
        self.entries.append(key_entry(name, token, scopes, groups))
        return token

    @property
    def config(self) -> str:
        return json.dumps(self.entries)

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}


@pytest.fixture
def keys() -> Keys:
    keys = Keys()
    keys.add("reader", "read")
    keys.add("writer", "write")
    keys.add("admin", "admin")
    keys.add("live_reader", "read", groups=("live",))
    keys.add("live_writer", "read", "write", groups=("live",))
    return keys


def two_sqlite(names: Names) -> str:
    """`live` and `stores` on hot, `history` on bulk: two SQLite files, so the registry filter shows."""
    return names.registry(names.backend("sqlite"), names.backend("sqlite", file="bulk"))


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    return problem


# -- 401: no key, unknown or malformed ------------------------------------------------------------------


FEAST_FETCH = {"features": ["live:orders_7d"], "entities": {"consumer_id": [1]}}
FEAST_WRITE = {"feature_view_name": "stores", "df": {"store_id": ["s-1"], "open_orders": [4]}}
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/features/fetch", FETCH_LIVE),
    ("POST", "/v1/features/write", {"group": "live", "rows": [live_row(1, 1)]}),
    ("GET", "/v1/registry", None),
    ("GET", "/readyz", None),
    ("POST", "/get-online-features", FEAST_FETCH),
    ("POST", "/write-to-online-store", FEAST_WRITE),
    ("GET", "/metrics", None),
    ("GET", "/v1/usage", None),
    ("GET", "/v1/status", None),
    ("GET", "/v1/cost", None),
]
OPEN = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_every_endpoint_but_healthz_needs_a_key(
    gateway: GatewayFactory, names: Names, keys: Keys, method: str, path: str, body: Any
) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        missing = await client.request(method, path, json=body)
        unknown = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {new_token()}"})
        admitted = await client.request(method, path, json=body, headers=keys.auth("admin"))
    assert_problem(missing, 401)
    assert missing.headers["www-authenticate"] == 'Bearer realm="feature-gateway"'
    assert_problem(unknown, 401)
    assert unknown.headers["www-authenticate"] == 'Bearer realm="feature-gateway", error="invalid_token"'
    assert admitted.status_code == 200, admitted.text


async def test_no_route_is_left_open(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    """Every operation of the spec, including any added after this test was written, refuses a request with no key."""
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        spec = (await client.get("/openapi.json")).json()
        routes = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]
        assert {path for _, path, _ in ENDPOINTS} <= {path for _, path in routes}
        answers = {}
        for method, path in routes:
            if path not in OPEN:
                answers[(method, path)] = (
                    await client.request(method, path.replace("{", "").replace("}", ""))
                ).status_code
    assert len(answers) >= len(ENDPOINTS)
    assert {route: status for route, status in answers.items() if status != 401} == {}


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "Bearer short",
        "Bearer fgk_two words here",
        "Bearer fgk_" + "a" * 600,
        "Bearer fgk_ünïcödé-ünïcödé-ünïcödé",
        "Token fgk_0123456789abcdef0123456789",
    ],
)
async def test_malformed_authorization_is_401(gateway: GatewayFactory, names: Names, keys: Keys, header: str) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        response = await client.post(
            "/v1/features/fetch", json=FETCH_LIVE, headers={"Authorization": header.encode("utf-8")}
        )
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="feature-gateway", error="invalid_token"'
    sent = header.partition(" ")[2].strip()
    if sent:
        assert sent not in response.text


async def test_the_key_is_checked_before_the_body(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    """An unauthenticated caller cannot make the gateway parse (or buffer) its body."""
    async with gateway(two_sqlite(names), api_keys=keys.config, max_body_bytes=64) as client:
        garbage = await client.post("/v1/features/fetch", headers=JSON, content=b"not json")
        huge = await client.post("/v1/features/fetch", headers=JSON, content=b"x" * 10_000)
    assert_problem(garbage, 401)
    assert_problem(huge, 401)


async def test_scheme_is_case_insensitive(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        response = await client.get("/v1/registry", headers={"Authorization": f"bearer  {keys.tokens['reader']}"})
    assert response.status_code == 200, response.text


async def test_healthz_docs_and_spec_stay_open(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        health = await client.get("/healthz")
        docs = await client.get("/docs")
        spec = await client.get("/openapi.json")
        bad_key_health = await client.get("/healthz", headers={"Authorization": "Bearer nonsense"})
    assert health.json() == {"status": "ok"}
    assert bad_key_health.status_code == 200
    assert docs.status_code == 200
    assert spec.status_code == 200
    # The spec describes the API, not the deployment: nothing of this registry (its backends' paths) is in it.
    assert str(names.dir) not in spec.text


# -- 403: scopes ----------------------------------------------------------------------------------------


async def test_scopes(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    write_body = {"group": "live", "rows": [live_row(1, 3)]}
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        writer_writes = await client.post("/v1/features/write", json=write_body, headers=keys.auth("writer"))
        reader_writes = await client.post("/v1/features/write", json=write_body, headers=keys.auth("reader"))
        reader_fetches = await client.post("/v1/features/fetch", json=FETCH_LIVE, headers=keys.auth("reader"))
        writer_fetches = await client.post("/v1/features/fetch", json=FETCH_LIVE, headers=keys.auth("writer"))
        reader_registry = await client.get("/v1/registry", headers=keys.auth("reader"))
        writer_registry = await client.get("/v1/registry", headers=keys.auth("writer"))
        admin_writes = await client.post("/v1/features/write", json=write_body, headers=keys.auth("admin"))
        admin_fetches = await client.post("/v1/features/fetch", json=FETCH_LIVE, headers=keys.auth("admin"))
        readiness = {name: await client.get("/readyz", headers=keys.auth(name)) for name in keys.tokens}
        reader_feast_writes = await client.post("/write-to-online-store", json=FEAST_WRITE, headers=keys.auth("reader"))
        writer_feast_writes = await client.post("/write-to-online-store", json=FEAST_WRITE, headers=keys.auth("writer"))
        writer_feast_fetches = await client.post("/get-online-features", json=FEAST_FETCH, headers=keys.auth("writer"))
        reader_feast_fetches = await client.post("/get-online-features", json=FEAST_FETCH, headers=keys.auth("reader"))
        writer_metrics = await client.get("/metrics", headers=keys.auth("writer"))
        reader_metrics = await client.get("/metrics", headers=keys.auth("reader"))
        writer_usage = await client.get("/v1/usage", headers=keys.auth("writer"))
        reader_usage = await client.get("/v1/usage", headers=keys.auth("reader"))

    assert writer_writes.json() == {"group": "live", "written": 1, "skipped_stale": 0}
    assert reader_fetches.json()["rows"][0]["values"] == [3]
    assert reader_registry.status_code == 200
    assert admin_writes.status_code == 200
    assert admin_fetches.json()["rows"][0]["values"] == [3]
    assert all(r.status_code == 200 for r in readiness.values()), {n: r.text for n, r in readiness.items()}

    assert writer_feast_writes.json()["written"] == 1
    assert reader_feast_fetches.json()["results"][1]["values"] == [3]
    assert reader_metrics.status_code == 200
    assert reader_usage.status_code == 200
    for response, scope, name in (
        (reader_writes, "write", "reader"),
        (writer_fetches, "read", "writer"),
        (writer_registry, "read", "writer"),
        (reader_feast_writes, "write", "reader"),
        (writer_feast_fetches, "read", "writer"),
        (writer_metrics, "read", "writer"),
        (writer_usage, "read", "writer"),
    ):
        problem = assert_problem(response, 403)
        assert f"'{scope}' scope" in problem["detail"]
        assert name not in response.text
        assert keys.tokens[name] not in response.text
        challenge = response.headers["www-authenticate"]
        assert challenge == f'Bearer realm="feature-gateway", error="insufficient_scope", scope="{scope}"'


# -- 403: group limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "group", "at"),
    [
        (["history:lifetime_orders"], "history", 0),
        (["live:orders_7d", "history:*"], "history", 1),
        (["live:*", "stores:open_orders"], "stores", 1),
        (["secret:anything"], "secret", 0),  # unknown groups are refused alike: nothing to learn
    ],
)
async def test_a_group_limited_key_cannot_fetch_other_groups(
    gateway: GatewayFactory, names: Names, keys: Keys, features: list[str], group: str, at: int
) -> None:
    entities: dict[str, list[Any]] = {"consumer_id": [1]}
    if group == "stores":
        entities["store_id"] = ["s"]
    body = {"entities": entities, "features": features}
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        limited = await client.post("/v1/features/fetch", json=body, headers=keys.auth("live_reader"))
        unlimited = await client.post("/v1/features/fetch", json=body, headers=keys.auth("reader"))
    problem = assert_problem(limited, 403)
    assert problem["detail"] == f"this API key may not use feature group {group!r}"
    assert problem["field"] == f"features[{at}]"
    assert "live_reader" not in limited.text
    assert unlimited.status_code == (422 if group == "secret" else 200)


async def test_a_group_limited_key_fetches_its_groups(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        await client.post(
            "/v1/features/write", json={"group": "live", "rows": [live_row(1, 5)]}, headers=keys.auth("admin")
        )
        one = await client.post("/v1/features/fetch", json=FETCH_LIVE, headers=keys.auth("live_reader"))
        star = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1]}, "features": ["live:*"]},
            headers=keys.auth("live_reader"),
        )
        # A malformed ref is a 422, but one that does not list the groups the key may not see.
        malformed = await client.post(
            "/v1/features/fetch",
            json={"entities": {"consumer_id": [1]}, "features": ["live"]},
            headers=keys.auth("live_reader"),
        )
    assert one.json()["rows"][0]["values"] == [5]
    assert star.json()["features"][0] == "live:orders_7d"
    assert star.json()["rows"][0]["statuses"][0] == "PRESENT"
    problem = assert_problem(malformed, 422)
    assert problem["field"] == "features[0]"
    assert "history" not in malformed.text
    assert "stores" not in malformed.text


async def test_a_group_limited_key_writes_only_its_groups(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        own = await client.post(
            "/v1/features/write", json={"group": "live", "rows": [live_row(1, 1)]}, headers=keys.auth("live_writer")
        )
        other = await client.post(
            "/v1/features/write",
            json={"group": "history", "rows": [history_row(1)]},
            headers=keys.auth("live_writer"),
        )
        unknown = await client.post(
            "/v1/features/write", json={"group": "nope", "rows": [history_row(1)]}, headers=keys.auth("live_writer")
        )
        stored = await client.post("/v1/features/fetch", json=FETCH_HISTORY, headers=keys.auth("admin"))
    assert own.json()["written"] == 1
    problem = assert_problem(other, 403)
    assert problem["detail"] == "this API key may not write feature group 'history'"
    assert problem["field"] == "group"
    unknown_problem = assert_problem(unknown, 403)
    assert "history" not in unknown.text  # no list of the registry's groups
    assert unknown_problem["field"] == "group"
    assert stored.json()["rows"][0]["statuses"] == ["MISSING"]  # the refused write wrote nothing


async def test_a_group_limited_key_sees_only_its_groups_in_the_registry(
    gateway: GatewayFactory, names: Names, keys: Keys
) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        limited = (await client.get("/v1/registry", headers=keys.auth("live_reader"))).json()
        full = (await client.get("/v1/registry", headers=keys.auth("reader"))).json()
    assert set(limited["groups"]) == {"live"}
    assert set(limited["entities"]) == {"consumer"}
    assert set(limited["backends"]) == {"hot"}
    assert limited["groups"]["live"] == full["groups"]["live"]
    assert set(full["groups"]) == {"live", "history", "stores"}
    assert set(full["backends"]) == {"hot", "bulk"}


async def test_group_limits_on_the_feast_and_observability_endpoints(
    gateway: GatewayFactory, names: Names, keys: Keys
) -> None:
    other_fetch = {"features": ["live:orders_7d", "history:lifetime_orders"], "entities": {"consumer_id": [1]}}
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        own_fetch = await client.post("/get-online-features", json=FEAST_FETCH, headers=keys.auth("live_reader"))
        other = await client.post("/get-online-features", json=other_fetch, headers=keys.auth("live_reader"))
        other_write = await client.post("/write-to-online-store", json=FEAST_WRITE, headers=keys.auth("live_writer"))
        own_write = await client.post(
            "/write-to-online-store",
            json={"feature_view_name": "live", "df": {k: [v] for k, v in live_row(1, 2).items()}},
            headers=keys.auth("live_writer"),
        )
        limited_usage = (await client.get("/v1/usage", headers=keys.auth("live_reader"))).json()
        full_usage = (await client.get("/v1/usage", headers=keys.auth("reader"))).json()
        limited_metrics = await client.get("/metrics", headers=keys.auth("live_reader"))
        limited_status = await client.get("/v1/status", headers=keys.auth("live_reader"))
        status = await client.get("/v1/status", headers=keys.auth("reader"))
        page = await client.get("/")
        stored = await client.post("/v1/features/fetch", json={**FETCH_LIVE}, headers=keys.auth("admin"))
    assert own_fetch.status_code == 200, own_fetch.text
    assert assert_problem(other, 403)["detail"] == "this API key may not use feature group 'history'"
    assert assert_problem(other_write, 403)["detail"] == "this API key may not write feature group 'stores'"
    assert own_write.json()["written"] == 1
    assert stored.json()["rows"][0]["values"] == [2]
    assert set(limited_usage["groups"]) == {"live"}
    assert all(ref.startswith("live:") for ref in limited_usage["never_requested"])
    assert set(full_usage["groups"]) == {"live", "history", "stores"}
    assert "history:lifetime_value" in full_usage["never_requested"]
    problem = assert_problem(limited_metrics, 403)
    assert problem["detail"] == "this API key is limited to some feature groups; /metrics reports on all of them"
    problem = assert_problem(limited_status, 403)
    assert problem["detail"] == "this API key is limited to some feature groups; /v1/status reports on all of them"
    assert set(status.json()["groups"]) == {"live", "history", "stores"}
    assert page.status_code == 200  # the status page itself holds no data; it sends the key it is given


# -- no keys configured ---------------------------------------------------------------------------------


async def test_without_keys_everything_is_open_and_a_warning_is_logged(
    gateway: GatewayFactory, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.main"):
        async with gateway(two_sqlite(names)) as client:
            fetched = await client.post("/v1/features/fetch", json=FETCH_LIVE)
            ignored = await client.post(
                "/v1/features/fetch", json=FETCH_LIVE, headers={"Authorization": "Bearer whatever-this-is"}
            )
    assert fetched.status_code == 200
    assert ignored.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("authentication is off") for m in warnings), warnings


async def test_with_keys_there_is_no_warning(
    gateway: GatewayFactory, names: Names, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.main"):
        async with gateway(two_sqlite(names), api_keys=keys.config):
            pass
    messages = [r.getMessage() for r in caplog.records]
    assert not any("authentication is off" in m for m in messages)
    assert f"API keys: {len(keys.entries)} configured (GATEWAY_API_KEYS)" in messages


# -- the OpenAPI spec -----------------------------------------------------------------------------------


async def test_the_spec_declares_the_bearer_scheme(gateway: GatewayFactory, names: Names, keys: Keys) -> None:
    async with gateway(two_sqlite(names), api_keys=keys.config) as client:
        spec = (await client.get("/openapi.json")).json()
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    operations = {op["operationId"]: op for path in spec["paths"].values() for op in path.values()}
    assert operations["fetch_features"]["security"] == [{"bearerAuth": ["read"]}]
    assert operations["get_registry"]["security"] == [{"bearerAuth": ["read"]}]
    assert operations["write_features"]["security"] == [{"bearerAuth": ["write"]}]
    assert operations["ready"]["security"] == [{"bearerAuth": []}]
    assert operations["get_online_features_feast"]["security"] == [{"bearerAuth": ["read"]}]
    assert operations["write_to_online_store_feast"]["security"] == [{"bearerAuth": ["write"]}]
    assert operations["metrics"]["security"] == [{"bearerAuth": ["read"]}]
    assert operations["get_usage"]["security"] == [{"bearerAuth": ["read"]}]
    assert operations["get_status"]["security"] == [{"bearerAuth": ["read"]}]
    assert operations["get_cost"]["security"] == [{"bearerAuth": ["read"]}]
    assert "security" not in operations["health"]
    assert "security" not in spec  # no global requirement: /healthz stays open
    for name, operation in operations.items():
        if name != "health":
            assert operation.get("security"), f"{name} does not declare that it needs a key"
            assert {"401", "403"} <= operation["responses"].keys(), name
    assert operations["fetch_features"]["tags"] == ["features"]
    assert operations["get_registry"]["tags"] == ["registry"]
    assert operations["ready"]["tags"] == ["health"]


# -- tokens never leak ----------------------------------------------------------------------------------


async def test_tokens_never_reach_logs_spans_or_bodies(
    gateway: GatewayFactory, names: Names, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = new_token()
    valid = keys.tokens["live_writer"]
    exporter = InMemorySpanExporter()
    registry = names.registry(names.backend("redis"), names.backend("cockroach"))
    responses: list[httpx.Response] = []
    with caplog.at_level(logging.DEBUG):
        async with gateway(registry, exporter=exporter, api_keys=keys.config) as client:
            for token in (wrong, valid):
                auth = {"Authorization": f"Bearer {token}"}
                responses += [
                    await client.post(
                        "/v1/features/write", json={"group": "live", "rows": [live_row(1, 1)]}, headers=auth
                    ),
                    await client.post("/v1/features/fetch", json=FETCH_LIVE, headers=auth),
                    await client.post("/v1/features/fetch", json=FETCH_HISTORY, headers=auth),  # 403 for valid
                    await client.post("/v1/features/fetch", content=b"{not json", headers={**auth, **JSON}),
                    await client.get("/v1/registry", headers=auth),
                    await client.get("/readyz", headers=auth),
                ]
    assert [r.status_code for r in responses] == [401] * 6 + [200, 200, 403, 400, 200, 200]
    spans = exporter.get_finished_spans()
    assert {"POST /v1/features/fetch", "POST /v1/features/write", "read hot", "write hot"} <= {s.name for s in spans}

    seen: list[str] = []
    for record in caplog.records:
        seen += [record.getMessage(), repr(record.args), str(record.exc_info), str(record.stack_info)]
    for span in spans:
        seen.append(span.name)
        seen.append(str(span.status.description))
        for attributes in [span.attributes, span.resource.attributes, *(e.attributes for e in span.events)]:
            for name, value in (attributes or {}).items():
                assert "authorization" not in name.lower(), name
                seen += [name, repr(value)]
        seen += [e.name for e in span.events]
    for response in responses:
        seen += [response.text, repr(response.headers)]
    text = "\n".join(seen)
    assert text  # there was something to search
    for token in (wrong, valid):
        assert token not in text
        assert token[4:20] not in text  # not even a piece of it
        assert hash_token(token) not in text
    assert "Bearer fgk_" not in text


# -- checking: constant time, and what it costs ---------------------------------------------------------


def test_every_hash_is_compared_whichever_key_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup never stops at the matching key: time depends on the number of keys, not on which one."""
    tokens = [new_token() for _ in range(8)]
    ring = KeyRing(parse_keys([key_entry(f"k{i}", t, ["read"]) for i, t in enumerate(tokens)], "test", None))
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(app.auth.hmac, "compare_digest", counting)
    for i, token in enumerate([*tokens, new_token()]):
        calls.clear()
        try:
            found = ring.identify(f"Bearer {token}").name
        except Unauthorized:
            found = None
        assert found == (f"k{i}" if i < len(tokens) else None)
        assert len(calls) == len(tokens)


def test_the_stored_hash_is_sha256_of_the_token() -> None:
    token = new_token()
    assert token.startswith("fgk_")
    assert len(token) == 4 + 43  # 32 random bytes in base64url
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert new_token() != token


def test_checking_a_key_is_cheap() -> None:
    """A loose bound (a slow KDF would take milliseconds); bench/auth_overhead.py measures it properly."""
    tokens = [new_token() for _ in range(100)]
    ring = KeyRing(parse_keys([key_entry(f"k{i}", t, ["read"]) for i, t in enumerate(tokens)], "test", None))
    header = f"Bearer {tokens[-1]}"
    started = time.process_time()  # the CPU the checks cost (a KDF's cost), not the wall clock a loaded box stretches
    for _ in range(1000):
        ring.check(header, "read")
    assert (time.process_time() - started) / 1000 < 0.001


# -- the key config -------------------------------------------------------------------------------------


REGISTRY_GROUPS = "live, history, stores"


def bad_configs() -> list[tuple[Any, str, str]]:
    token = new_token()
    good = key_entry("ranker", token, ["read"])
    other = key_entry("other", new_token(), ["write"])

    def entry(**changes: Any) -> dict[str, Any]:
        return {**good, **changes}

    def without(name: str) -> dict[str, Any]:
        return {k: v for k, v in good.items() if k != name}

    return [
        ({"keys": [good]}, "(root)", "expected a list of keys"),
        ([], "(root)", "no keys; give at least one"),
        ([good, "ranker"], "[1]", "expected a mapping"),
        ([without("name")], "[0].name", "required"),
        ([without("sha256")], "[0].sha256", "required"),
        ([without("scopes")], "[0].scopes", "required"),
        ([entry(name="has space")], "[0].name", "expected 1 to 64 letters"),
        ([entry(name=7)], "[0].name", "expected 1 to 64 letters"),
        ([good, {**other, "name": "ranker"}], "[1].name", "'ranker' is already the name of [0]"),
        ([entry(sha256="abc")], "[0].sha256", "expected the 64 hex digits"),
        ([entry(sha256=token)], "[0].sha256", "this looks like the token itself"),
        ([good, {**other, "sha256": good["sha256"].upper()}], "[1].sha256", "the same hash as [0]"),
        ([entry(scopes="read")], "[0].scopes", "expected a non-empty list"),
        ([entry(scopes=[])], "[0].scopes", "expected a non-empty list"),
        ([entry(scopes=["read", "delete"])], "[0].scopes[1]", "unknown scope 'delete'; expected one of read"),
        ([entry(scopes=["read", "read"])], "[0].scopes[1]", "'read' is listed twice"),
        (
            [entry(groups=["live", "nope"])],
            "[0].groups[1]",
            f"unknown group 'nope'; the registry has {REGISTRY_GROUPS}",
        ),
        ([entry(groups=[])], "[0].groups", "expected a non-empty list"),
        ([entry(groups=["live", 3])], "[0].groups[1]", "expected one of the feature groups"),
        ([entry(scopes=["admin"], groups=["live"])], "[0].groups", "an admin key may do everything"),
        ([entry(expires="2027-01-01")], "[0].expires", "unknown field; expected one of name, sha256, scopes, groups"),
    ]


@pytest.mark.parametrize(("doc", "path", "reason"), bad_configs())
def test_bad_key_config_names_the_field(names: Names, doc: Any, path: str, reason: str) -> None:
    registry = parse_registry(two_sqlite(names), "test-registry", env={})
    with pytest.raises(KeyConfigError) as raised:
        create_app(Settings(api_keys=json.dumps(doc)), registry=registry)
    assert raised.value.path == path
    assert raised.value.detail.startswith(f"GATEWAY_API_KEYS: {path}: ")
    assert reason in raised.value.reason
    if isinstance(doc, list):
        for entry in doc:  # a hash (or a token pasted in its place) is never quoted back
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) > 8:
                assert entry["sha256"] not in raised.value.detail


@pytest.mark.parametrize(
    ("settings", "path", "reason"),
    [
        ({"api_keys": "[{"}, "line 1 column 3", "not valid JSON"),
        ({"api_keys": " "}, "(root)", "empty; give a JSON list of keys, or unset it"),
        ({"api_keys": "[]", "api_keys_file": "keys.yaml"}, "(root)", "GATEWAY_API_KEYS_FILE is set too"),
        ({"api_keys_file": "missing.yaml"}, "(file)", "cannot read"),
        ({"api_keys_file": "broken.yaml"}, "line 3", "not valid YAML"),
        ({"api_keys_file": "empty.yaml"}, "(root)", "no keys"),
        ({"api_keys_file": "broken.json"}, "line 1 column 2", "not valid JSON"),
    ],
)
def test_bad_key_sources(names: Names, tmp_path: Path, settings: dict[str, str], path: str, reason: str) -> None:
    (tmp_path / "broken.yaml").write_text("- name: a\n  scopes: [read\n")
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    (tmp_path / "broken.json").write_text("[name: a]")
    if "api_keys_file" in settings:
        settings = {**settings, "api_keys_file": str(tmp_path / settings["api_keys_file"])}
    registry = parse_registry(two_sqlite(names), "test-registry", env={})
    with pytest.raises(KeyConfigError) as raised:
        create_app(Settings(**settings), registry=registry)
    assert raised.value.path == path
    assert reason in raised.value.reason


@pytest.mark.parametrize("suffix", ["yaml", "json"])
async def test_keys_load_from_a_file(gateway: GatewayFactory, names: Names, tmp_path: Path, suffix: str) -> None:
    token = new_token()
    path = tmp_path / f"keys.{suffix}"
    if suffix == "yaml":
        path.write_text(
            f"# made with feature-gateway keys new\n- name: ranker\n  sha256: {hash_token(token)}\n"
            "  scopes: [read]\n  groups: [live]\n"
        )
    else:
        path.write_text(json.dumps([key_entry("ranker", token, ["read"], ["live"])], indent=2))
    async with gateway(two_sqlite(names), api_keys_file=path) as client:
        allowed = await client.post("/v1/features/fetch", json=FETCH_LIVE, headers={"Authorization": f"Bearer {token}"})
        other_group = await client.post(
            "/v1/features/fetch", json=FETCH_HISTORY, headers={"Authorization": f"Bearer {token}"}
        )
        missing = await client.post("/v1/features/fetch", json=FETCH_LIVE)
    assert allowed.status_code == 200, allowed.text
    assert other_group.status_code == 403
    assert missing.status_code == 401


def test_keys_are_read_from_the_environment(names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    token = new_token()
    monkeypatch.setenv("GATEWAY_API_KEYS", json.dumps([key_entry("env", token, ["write"])]))
    registry = parse_registry(two_sqlite(names), "test-registry", env={})
    ring: KeyRing = create_app(Settings(), registry=registry).state.keyring
    assert ring.enabled
    key = ring.check(f"Bearer {token}", "write")
    assert key is not None
    assert key.name == "env"


# -- the CLI: keys new, and serve's loopback rule --------------------------------------------------------


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, "GATEWAY_DEMO_DIR": str(tmp_path / "demo"), **extra}


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "gateway.example.com"])
def test_serve_without_keys_refuses_a_non_loopback_host(tmp_path: Path, host: str) -> None:
    port = free_port()
    started = time.monotonic()
    result = run("serve", "--host", host, "--port", str(port), env=cli_env(tmp_path))
    assert result.returncode == 2
    assert f"error: refusing to serve on {host}: no API keys are configured" in result.stderr
    assert "GATEWAY_API_KEYS" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_stops_on_a_bad_key_config(tmp_path: Path) -> None:
    env = cli_env(tmp_path, GATEWAY_API_KEYS='[{"name": "x", "sha256": "00", "scopes": ["read"]}]')
    result = run("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert "error: invalid API keys: GATEWAY_API_KEYS: [0].sha256: expected the 64 hex digits" in result.stderr
    assert "Traceback" not in result.stderr


def wait_until_up(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert server.poll() is None, "serve exited"
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("serve did not come up")


def test_keys_new_then_serve_on_all_interfaces(tmp_path: Path) -> None:
    made = run("keys", "new", "--name", "ranker", "--scope", "read", "--group", "consumer_live", env=cli_env(tmp_path))
    assert made.returncode == 0, made.stderr
    lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
    token, entry = lines["token"], json.loads(lines["entry"])
    assert entry == {"name": "ranker", "sha256": hash_token(token), "scopes": ["read"], "groups": ["consumer_live"]}
    assert "shown only this once" in made.stderr
    assert token not in made.stderr

    port = free_port()
    env = cli_env(tmp_path, GATEWAY_API_KEYS=json.dumps([entry]))
    server = subprocess.Popen(
        [*CLI, "serve", "--host", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        wait_until_up(port, server)
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        body = {"entities": {"consumer_id": [101]}, "features": ["consumer_live:orders_7d"]}
        anonymous = httpx.post(f"{base}/v1/features/fetch", json=body, timeout=5)
        fetched = httpx.post(f"{base}/v1/features/fetch", json=body, headers=auth, timeout=5)
        other = httpx.post(
            f"{base}/v1/features/fetch",
            json={**body, "features": ["consumer_history:*"]},
            headers=auth,
            timeout=5,
        )
        health = httpx.get(f"{base}/healthz", timeout=5)
    finally:
        server.terminate()
        server.wait(15)
        output = server.stdout.read() if server.stdout is not None else ""
        if server.stdout is not None:
            server.stdout.close()
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="feature-gateway"'
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["rows"][0]["statuses"] == ["PRESENT"]
    assert other.status_code == 403
    assert other.json()["detail"] == "this API key may not use feature group 'consumer_history'"
    assert health.status_code == 200
    assert "authorization: Bearer $TOKEN" in output  # the demo's curl line says to send the key
    assert "authentication is off" not in output
    assert token not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "bad name", "--scope", "read"], "error: --name: expected 1 to 64 letters"),
        (["--name", "a", "--scope", "admin", "--group", "g"], "error: --group: an admin key may do everything"),
        (["--name", "a", "--scope", "read", "--group", "nope", "--registry", "DEMO"], "error: --group: unknown group"),
        (["--name", "a", "--scope", "delete"], "invalid choice: 'delete'"),
        (["--name", "a"], "the following arguments are required: --scope"),
    ],
)
def test_keys_new_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    from app.main import DEMO_REGISTRY

    args = [str(DEMO_REGISTRY) if a == "DEMO" else a for a in args]
    result = run("keys", "new", *args, env=cli_env(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "token:" not in result.stdout


def test_keys_new_with_several_scopes_and_groups(tmp_path: Path) -> None:
    from app.main import DEMO_REGISTRY

    result = run(
        "keys", "new", "--name", "etl", "--scope", "read", "--scope", "write", "--scope", "read",
        "--group", "consumer_live", "--group", "store_stats", "--registry", str(DEMO_REGISTRY),
        env=cli_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout.splitlines()[1].removeprefix("entry: "))
    assert entry["scopes"] == ["read", "write"]
    assert entry["groups"] == ["consumer_live", "store_stats"]
    [key] = parse_keys([entry], "test", None)
    assert key.groups == frozenset({"consumer_live", "store_stats"})


def test_a_generated_sdk_sends_the_key(tmp_path: Path) -> None:
    """The spec's bearer scheme makes openapi-python-client generate an AuthenticatedClient that sends the key."""
    token = new_token()
    port = free_port()
    env = cli_env(tmp_path, GATEWAY_API_KEYS=json.dumps([key_entry("sdk", token, ["read"], ["store_stats"])]))
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    sdk_dir = tmp_path / "sdk"
    try:
        wait_until_up(port, server)
        base = f"http://127.0.0.1:{port}"
        spec = tmp_path / "openapi.json"
        spec.write_bytes(httpx.get(f"{base}/openapi.json", timeout=5).content)
        bin_dir = Path(sys.executable).parent
        generator = shutil.which("openapi-python-client", path=str(bin_dir))
        assert generator, "openapi-python-client is in the dev extras"
        result = subprocess.run(
            [generator, "generate", "--path", str(spec), "--output-path", str(sdk_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        sys.path.insert(0, str(sdk_dir))
        try:
            sdk = importlib.import_module("feature_gateway_client")
            fetch_features = importlib.import_module("feature_gateway_client.api.features.fetch_features")
            models = importlib.import_module("feature_gateway_client.models")
            assert "client: AuthenticatedClient," in inspect.getsource(fetch_features.sync)

            def body(features: list[str]) -> Any:
                entities = models.FetchRequestEntities.from_dict({"store_id": ["s-1"]})
                return models.FetchRequest(entities=entities, features=features)

            with sdk.AuthenticatedClient(base_url=base, token=token) as client:
                answer = fetch_features.sync_detailed(client=client, body=body(["store_stats:*"]))
                other = fetch_features.sync_detailed(client=client, body=body(["consumer_live:orders_7d"]))
            with sdk.Client(base_url=base) as anonymous:
                refused = fetch_features.sync_detailed(client=anonymous, body=body(["store_stats:*"]))
        finally:
            sys.path.remove(str(sdk_dir))
            for name in [m for m in sys.modules if m.startswith("feature_gateway_client")]:
                del sys.modules[name]
    finally:
        server.terminate()
        server.wait(15)
    assert answer.status_code == 200, answer.content
    assert answer.parsed.features[0].startswith("store_stats:")
    assert other.status_code == 403
    assert other.parsed.detail == "this API key may not use feature group 'consumer_live'"
    assert refused.status_code == 401
