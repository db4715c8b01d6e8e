"""A web page cannot write to (or read from) a gateway on loopback: JSON bodies only, CORS off unless configured."""

from __future__ import annotations

import json

import pytest

from tests.support.gateways import GatewayFactory
from tests.support.registries import Names

WRITE = json.dumps({"group": "stores", "rows": [{"store_id": "s", "open_orders": 66}]}).encode()
FETCH = json.dumps({"entities": {"store_id": ["s"]}, "features": ["stores:open_orders"]}).encode()
PAGE = "https://evil.example"


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/plain"},  # what a page's fetch() sends for a string body, without a preflight
        {"content-type": "text/plain;charset=UTF-8"},
        {"content-type": "application/x-www-form-urlencoded"},  # a plain HTML form
        {"content-type": "multipart/form-data; boundary=x"},
        {},  # a Blob or ArrayBuffer body: no content type at all, still no preflight
        {"content-type": "application/json; charset=latin-1"},
        {"content-type": "application/jsonp"},
    ],
)
@pytest.mark.parametrize("path", ["/v1/features/write", "/v1/features/fetch"])
async def test_bodies_not_declared_json_are_refused_with_415(
    gateway: GatewayFactory, names: Names, headers: dict[str, str], path: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post(path, content=WRITE if path.endswith("write") else FETCH, headers=headers)
        stored = await client.post("/v1/features/fetch", json=json.loads(FETCH))
    assert response.status_code == 415, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "(content-type)"
    assert stored.json()["rows"][0]["statuses"] == ["MISSING"]  # nothing was written


@pytest.mark.parametrize("media", ["application/json", "Application/JSON; charset=utf-8"])
async def test_json_bodies_are_accepted(gateway: GatewayFactory, names: Names, media: str) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post("/v1/features/write", content=WRITE, headers={"content-type": media})
    assert response.status_code == 200, response.text


async def test_feast_clients_post_without_a_content_type_but_pages_cannot(
    gateway: GatewayFactory, names: Names
) -> None:
    """Feast's remote online store sends `data=json.dumps(...)`: no content type, and no Origin (not a browser).
    A browser sends Origin with every cross-origin POST, so the same body from a page is refused."""
    feast_write = json.dumps(
        {"feature_view_name": "stores", "df": {"store_id": ["s"], "open_orders": [5]}, "allow_registry_cache": True}
    ).encode()
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        from_page = await client.post("/write-to-online-store", content=feast_write, headers={"origin": PAGE})
        as_text = await client.post(
            "/write-to-online-store", content=feast_write, headers={"content-type": "text/plain"}
        )
        from_feast = await client.post("/write-to-online-store", content=feast_write)
        read = await client.post("/get-online-features", content=FETCH)
        read_from_page = await client.post("/get-online-features", content=FETCH, headers={"origin": PAGE})
    assert from_page.status_code == 415
    assert as_text.status_code == 415
    assert from_feast.status_code == 200, from_feast.text
    assert read.status_code == 200
    assert read.json()["results"][1]["values"] == [5]
    assert read_from_page.status_code == 415


async def test_cors_is_off_unless_origins_are_configured(gateway: GatewayFactory, names: Names) -> None:
    preflight = {
        "origin": PAGE,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        off = await client.options("/v1/features/write", headers=preflight)
        simple = await client.post(
            "/v1/features/fetch", content=FETCH, headers={**preflight, "content-type": "application/json"}
        )
    async with gateway(names.registry(names.backend("sqlite")), cors_origins=["https://console.example"]) as client:
        allowed = await client.options("/v1/features/write", headers={**preflight, "origin": "https://console.example"})
        other = await client.options("/v1/features/write", headers=preflight)
        answer = await client.post(
            "/v1/features/fetch",
            content=FETCH,
            headers={"origin": "https://console.example", "content-type": "application/json"},
        )
    assert "access-control-allow-origin" not in off.headers
    assert "access-control-allow-origin" not in simple.headers  # the browser will not hand the answer to the page
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://console.example"
    assert "content-type" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert answer.headers["access-control-allow-origin"] == "https://console.example"
    assert "server-timing" in answer.headers["access-control-expose-headers"].lower()
