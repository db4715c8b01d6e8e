"""The hot routes' fast path (routers/fast_path.py): served ahead of FastAPI's stack, with the same answers,
authentication, limits, admission, metrics and spec as the full stack; and MessagePack answers."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from app.main import create_app
from app.registry.load import parse_registry
from app.resilience.admission import Work
from app.settings import Settings
from tests.support.clients import live_row, write
from tests.support.registries import Names
from tests.test_auth import Keys

ORIGIN = "https://console.example"


@pytest.fixture
def keys() -> Keys:
    keys = Keys()
    keys.add("reader", "read")
    keys.add("writer", "write")
    return keys


class SeenByFastAPI:
    """Middleware of FastAPI's stack that records the paths it was asked for: the fast path never enters it."""

    seen: list[str] = []  # noqa: RUF012 (one app per test at a time; each test clears it)

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)


def _app(names: Names, **settings: Any) -> Any:
    registry = parse_registry(
        names.registry(names.backend("redis"), names.backend("sqlite", file="bulk")), "test-registry", env={}
    )
    settings = {"default_deadline_ms": 2000, "admission": False, "freeze_heap": False, **settings}
    app = create_app(Settings(cors_origins=[ORIGIN], **settings), registry=registry)
    app.add_middleware(SeenByFastAPI)
    SeenByFastAPI.seen.clear()
    return app


def _comparable(response: httpx.Response) -> tuple[int, str, Any]:
    """Status, content type and body, less the times that differ from one request to the next."""
    kind = response.headers["content-type"]
    body = msgspec.msgpack.decode(response.content) if kind == "application/msgpack" else response.json()
    if isinstance(body, dict) and "backends" in body:
        body["backends"] = {name: b["status"] for name, b in body["backends"].items()}
    return response.status_code, kind, body


async def test_hot_routes_answer_as_the_full_stack_does_without_entering_it(names: Names, keys: Keys) -> None:
    app = _app(names, api_keys=keys.config, max_body_bytes=4096)
    fetch = {"entities": {"consumer_id": [1, 2]}, "features": ["live:orders_7d", "history:lifetime_orders"]}
    reader, writer = keys.auth("reader"), keys.auth("writer")
    calls: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/features/write", {"json": {"group": "live", "rows": [live_row(1, 5)]}}, writer),
        ("/v1/features/fetch", {"json": fetch}, reader),
        ("/v1/features/fetch", {"json": fetch}, {**reader, "accept": "application/msgpack"}),
        ("/v1/features/fetch", {"json": fetch}, {}),  # no key: 401
        ("/v1/features/fetch", {"json": fetch}, writer),  # no read scope: 403
        ("/v1/features/write", {"json": {"group": "live", "rows": [live_row(1, 5)]}}, reader),  # 403
        ("/v1/features/fetch", {"content": b"x" * 5000, "headers": {"content-type": "application/json"}}, reader),
        ("/v1/features/fetch", {"content": b"{}", "headers": {"content-type": "text/plain"}}, reader),  # 415
        ("/v1/features/fetch", {"json": {**fetch, "features": ["live:nope"]}}, reader),  # 422
        ("/v1/features/fetch", {"json": {"entities": {"consumer_id": [1]}, "service": "nope"}}, reader),
        ("/get-online-features", {"json": {"features": ["live:orders_7d"], "entities": {"consumer_id": [1]}}}, reader),
        ("/get-online-features", {"content": b'{"features": ["live:x"], "entities": {"consumer_id": [1]}}'}, {}),
        ("/write-to-online-store", {"json": {"feature_view_name": "live", "df": {"consumer_id": [1]}}}, writer),
    ]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            fast, full = [], []
            for path, kwargs, auth in calls:
                headers = {**auth, **kwargs.pop("headers", {})}
                fast.append(await client.post(path, headers=headers, **kwargs))
                assert SeenByFastAPI.seen == []  # (what the fast path took, FastAPI's stack never saw)
                full.append(await client.post(path, headers={**headers, "origin": ORIGIN}, **kwargs))
                assert SeenByFastAPI.seen == [path]
                SeenByFastAPI.seen.clear()
            metrics = (await client.get("/metrics", headers=reader)).text
    assert [r.status_code for r in fast] == [200, 200, 200, 401, 403, 403, 413, 415, 422, 422, 200, 401, 422]
    assert [_comparable(r) for r in fast] == [_comparable(r) for r in full]
    assert fast[0].json()["written"] == 1
    assert fast[1].json()["rows"][0]["values"][0] == 5  # written by the first call (through the fast path)
    assert fast[1].json()["rows"][0]["statuses"] == ["PRESENT", "MISSING"]
    assert fast[10].json()["results"][1]["values"] == [5]  # Feast's columns: the join key's, then the feature's
    assert fast[10].headers["x-feature-gateway-degraded"] == "false"
    assert "www-authenticate" in fast[3].headers
    assert "server-timing" in fast[1].headers
    assert all("access-control-allow-origin" not in r.headers for r in fast)
    assert all(r.headers["access-control-allow-origin"] == ORIGIN for r in full)
    # Both paths counted under the route: 4 + 4 of each status of the fetches
    line = 'feature_gateway_http_requests_total{route="/v1/features/fetch",method="POST",status="200"}'
    assert f"{line} 4" in metrics


async def test_admission_refuses_on_the_fast_path(names: Names) -> None:
    app = _app(names, admission=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            await write(client, "live", [live_row(1, 5)])
            limiter = app.state.gateway.admission
            held = 0
            while limiter.acquire(Work.READ):  # every slot taken, as by requests in flight
                held += 1
            body = {"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"]}
            refused = await client.post("/v1/features/fetch", json=body)
            for _ in range(held):
                limiter.release(Work.READ, None, 1.0)
            served = await client.post("/v1/features/fetch", json=body)
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["work"] == "read"
    assert "retry-after" in refused.headers
    assert served.status_code == 200
    assert served.json()["rows"][0]["values"] == [5]


@pytest.mark.parametrize(
    ("accept", "binary"),
    [
        ("application/msgpack", True),
        ("application/x-msgpack", True),
        ("application/msgpack, application/json;q=0.5", True),
        ("application/json, application/msgpack", False),
        ("application/json", False),
        ("*/*", False),
        (None, False),
    ],
)
async def test_msgpack_is_the_same_document(names: Names, accept: str | None, binary: bool) -> None:
    app = _app(names)
    body = {
        "entities": {"consumer_id": [1, 2]},
        "features": ["live:orders_7d", "history:lifetime_value"],
        "include_timestamps": True,
    }
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            await write(client, "live", [live_row(1, 5)])
            as_json = await client.post("/v1/features/fetch", json=body)
            headers = {} if accept is None else {"accept": accept}
            answer = await client.post("/v1/features/fetch", json=body, headers=headers)
    assert answer.headers["content-type"] == ("application/msgpack" if binary else "application/json")
    assert _comparable(answer)[2] == _comparable(as_json)[2]
    assert _comparable(answer)[2]["rows"][0]["values"][0] == 5


async def test_the_spec_documents_the_hot_routes_from_their_declarations(names: Names) -> None:
    app = _app(names)
    spec = app.openapi()
    fetch = spec["paths"]["/v1/features/fetch"]["post"]
    write_op = spec["paths"]["/v1/features/write"]["post"]
    assert fetch["operationId"] == "fetch_features"
    assert write_op["operationId"] == "write_features"
    assert fetch["security"] == [{"bearerAuth": ["read"]}]
    assert write_op["security"] == [{"bearerAuth": ["write"]}]
    ok = fetch["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/FetchResponse"}
    assert ok["application/msgpack"]["schema"] == {"$ref": "#/components/schemas/FetchResponse"}
    assert {"413", "415", "422", "401", "403", "503"} <= set(fetch["responses"])
