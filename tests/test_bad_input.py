"""Hostile and odd input: NaN and numbers past float64, unknown fields, Unicode ids and strings on every
backend, NUL, deep nesting and huge bodies. Each gets a 4xx problem+json naming the field, or round-trips."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.clients import JSON, fetch, live_row, write
from tests.support.gateways import GatewayFactory, GatewayProcess
from tests.support.registries import Names

GOOD_FETCH = b'{"entities": {"consumer_id": [1]}, "features": ["live:avg_basket"]}'


def with_deadline(token: str) -> bytes:
    return GOOD_FETCH[:-1] + f', "deadline_ms": {token}}}'.encode()


def assert_problem(response: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["field"] == field, problem
    return problem


def row_bytes(avg_basket: str = "1.5", embedding: str = "[0.5, 1, 2]", consumer: str = "1") -> bytes:
    """A `live` write body as raw JSON text, so tokens no JSON encoder emits (NaN, 1e309) can be sent."""
    return (
        f'{{"group": "live", "rows": [{{"consumer_id": {consumer}, "orders_7d": 1, "avg_basket": {avg_basket}, '
        f'"active": true, "name": "n", "raw": null, "embedding": {embedding}, "ids": null}}]}}'
    ).encode()


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "nan", "inf"])
async def test_nan_and_infinity_are_not_json(gateway: GatewayFactory, names: Names, token: str) -> None:
    """JSON (RFC 8259) has no NaN or Infinity: the tokens make the body malformed, on both endpoints."""
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        write_response = await client.post("/v1/features/write", headers=JSON, content=row_bytes(avg_basket=token))
        fetch_response = await client.post("/v1/features/fetch", headers=JSON, content=with_deadline(token))
        id_response = await client.post(
            "/v1/features/fetch", headers=JSON, content=GOOD_FETCH.replace(b"[1]", f"[{token}]".encode())
        )
        stored = await fetch(client, entities={"consumer_id": [1]}, features=["live:avg_basket"])
    for response in (write_response, fetch_response, id_response):
        problem = assert_problem(response, 400, "(body)")
        assert "not valid JSON" in problem["detail"]
    assert stored["rows"][0]["statuses"] == ["MISSING"]  # nothing was written


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/features/fetch", b'{"entities": {"store_id": ["\xff"]}, "features": ["stores:open_orders"]}'),
        ("/v1/features/fetch", b'{"entities": {"store_id": ["\xed\xa0\x80"]}, "features": ["stores:open_orders"]}'),
        ("/v1/features/fetch", b'{"entities": {"\xc3\x28": [1]}, "features": ["live:orders_7d"]}'),
        ("/v1/features/write", row_bytes().replace(b'"name": "n"', b'"name": "\xfe\xff"')),
        ("/v1/features/fetch", b'{"entities": {"store_id": ["\\ud800"]}, "features": ["stores:open_orders"]}'),
        ("/v1/features/fetch", b"\xef\xbb\xbf" + GOOD_FETCH),  # a byte-order mark: JSON forbids it
    ],
)
async def test_text_that_is_not_utf8_is_malformed(
    gateway: GatewayFactory, names: Names, path: str, body: bytes
) -> None:
    """Invalid UTF-8 (raw bytes, a UTF-8-encoded surrogate, a lone \\ud800 escape) is a 400, not a 500."""
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post(path, headers=JSON, content=body)
    assert_problem(response, 400, "(body)")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (row_bytes(avg_basket="1e309"), "rows[0].avg_basket"),
        (row_bytes(avg_basket="-1e309"), "rows[0].avg_basket"),
        (row_bytes(avg_basket="1" + "0" * 400), "rows[0].avg_basket"),  # an integer float() cannot take
        (row_bytes(embedding="[0.5, 1e309, 2]"), "rows[0].embedding"),
        (row_bytes(embedding="[0.5, 1e39, 2]"), "rows[0].embedding"),  # past float32
        (row_bytes(embedding="[0.5, " + "9" * 400 + ", 2]"), "rows[0].embedding"),
        (row_bytes(consumer="1e309"), "rows[0].consumer_id"),
        (row_bytes(consumer="9" * 5000), "rows[0]"),  # msgspec's own integer limit: the row is named
    ],
)
async def test_numbers_past_their_dtype_are_refused_naming_the_field(
    gateway: GatewayFactory, names: Names, body: bytes, field: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post("/v1/features/write", headers=JSON, content=body)
        stored = await fetch(client, entities={"consumer_id": [1]}, features=["live:avg_basket"])
    assert_problem(response, 422, field)
    assert stored["rows"][0]["statuses"] == ["MISSING"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (GOOD_FETCH.replace(b"[1]", b"[1e309]"), "entities.consumer_id[0]"),
        (GOOD_FETCH.replace(b"[1]", b"[-1e309]"), "entities.consumer_id[0]"),
        (GOOD_FETCH.replace(b"[1]", b"[" + b"9" * 5000 + b"]"), "entities"),
        (with_deadline("1e309"), "deadline_ms"),
    ],
)
async def test_fetch_numbers_past_float64_are_refused(
    gateway: GatewayFactory, names: Names, body: bytes, field: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post("/v1/features/fetch", headers=JSON, content=body)
    assert_problem(response, 422, field)


async def test_tiny_and_large_finite_floats_are_stored(gateway: GatewayFactory, names: Names) -> None:
    """Underflow rounds to 0.0 as IEEE 754 says; the largest float64 is stored as is."""
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        assert (
            await client.post("/v1/features/write", headers=JSON, content=row_bytes(avg_basket="1e-400"))
        ).status_code == 200
        tiny = await fetch(client, entities={"consumer_id": [1]}, features=["live:avg_basket"])
        largest = await client.post(
            "/v1/features/write", headers=JSON, content=row_bytes(avg_basket="1.7976931348623157e308")
        )
        assert largest.status_code == 200, largest.text
        large = await fetch(client, entities={"consumer_id": [1]}, features=["live:avg_basket"])
    assert tiny["rows"][0]["values"] == [0.0]
    assert large["rows"][0]["values"] == [1.7976931348623157e308]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/features/fetch", {"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"], "limit": 1}, "limit"),
        ("/v1/features/write", {"group": "live", "rows": [live_row(1, 1)], "upsert": True}, "upsert"),
        ("/v1/features/write", {"group": "live", "rows": [live_row(1, 1, colour="red")]}, "rows[0].colour"),
        ("/v1/features/write", {"group": "live", "rows": [live_row(1, 1), live_row(2, 1, x=None)]}, "rows[1].x"),
    ],
)
async def test_unknown_fields_are_refused(
    gateway: GatewayFactory, names: Names, path: str, body: dict[str, Any], field: str
) -> None:
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        response = await client.post(path, json=body)
        stored = await fetch(client, entities={"consumer_id": [1, 2]}, features=["live:orders_7d"])
    problem = assert_problem(response, 422, field)
    assert "unknown field" in problem["detail"]
    assert [r["statuses"] for r in stored["rows"]] == [["MISSING"], ["MISSING"]]  # the batch was refused whole


# Ids and strings a byte-oriented store could mangle: multi-byte and astral characters, right-to-left text,
# combining marks (never normalized: é precomposed and e + U+0301 are two ids), separators, quotes.
UNICODE_IDS = [
    "pizza-🍕",
    "👩‍👩‍👧‍👦",
    "𝕏-𝔸",
    "مرحبا بالعالم",
    "שלום\u200f",
    "\u00e9",
    "e\u0301",
    "Z\u0351\u0361\u0334a\u0352l\u0336g\u0315o",
    "tab\tnew\nline\x7f\x01",
    "\ufeffbom",
    "live:1",
    "%s %d {} * ? \\",
    "'; DROP TABLE feature_values; --",
    "🍕" * 256,  # the longest id: 256 characters, 1 KiB of UTF-8
]
UNICODE_STRINGS = ["نص عربي", "a\x00b", "\x00", "🍕" * 1000, "e\u0301\u0301", "", "\\u0000 stays text"]


def unicode_registry(names: Names, kind: str) -> str:
    return f"""
backends:
  hot: {names.backend(kind)}
entities:
  store: {{join_key: store_id, dtype: string}}
groups:
  labels:
    entity: store
    backend: hot
    features:
      label: {{dtype: string, default: "-"}}
      index: {{dtype: int64, default: -1}}
"""


async def test_unicode_ids_and_strings_round_trip(gateway: GatewayFactory, names: Names, kind: str) -> None:
    labels = [UNICODE_STRINGS[i % len(UNICODE_STRINGS)] for i in range(len(UNICODE_IDS))]
    rows = [
        {"store_id": sid, "label": label, "index": i}
        for i, (sid, label) in enumerate(zip(UNICODE_IDS, labels, strict=True))
    ]
    async with gateway(unicode_registry(names, kind)) as client:
        assert (await write(client, "labels", rows))["written"] == len(rows)
        answer = await fetch(client, entities={"store_id": UNICODE_IDS}, features=["labels:*"])
        # The same ids sent \\u-escaped (surrogate pairs for astral characters) are the same entities.
        escaped = (
            b'{"entities": {"store_id": ["pizza-\\ud83c\\udf55", "e\\u0301", "\\u00e9"]}, "features": ["labels:index"]}'
        )
        response = await client.post("/v1/features/fetch", headers=JSON, content=escaped)
    assert [row["entity"]["store_id"] for row in answer["rows"]] == UNICODE_IDS
    assert [row["values"] for row in answer["rows"]] == [[label, i] for i, label in enumerate(labels)]
    assert all(row["statuses"] == ["PRESENT", "PRESENT"] for row in answer["rows"])
    assert response.status_code == 200, response.text
    assert [row["values"] for row in response.json()["rows"]] == [[0], [6], [5]]
    assert [row["entity"]["store_id"] for row in response.json()["rows"]] == ["pizza-🍕", "e\u0301", "\u00e9"]


async def test_unicode_ids_are_not_normalized(gateway: GatewayFactory, names: Names, kind: str) -> None:
    async with gateway(unicode_registry(names, kind)) as client:
        await write(client, "labels", [{"store_id": "\u00e9", "label": "precomposed", "index": 1}])
        answer = await fetch(client, entities={"store_id": ["\u00e9", "e\u0301"]}, features=["labels:label"])
    assert [row["values"] for row in answer["rows"]] == [["precomposed"], ["-"]]
    assert [row["statuses"] for row in answer["rows"]] == [["PRESENT"], ["MISSING"]]


@pytest.mark.parametrize("store_id", ["a\x00b", "\x00", "nul at end\x00"])
async def test_nul_in_an_id_is_refused_on_fetch_and_write(
    gateway: GatewayFactory, names: Names, kind: str, store_id: str
) -> None:
    async with gateway(unicode_registry(names, kind)) as client:
        write_response = await client.post(
            "/v1/features/write",
            json={
                "group": "labels",
                "rows": [
                    {"store_id": "ok", "label": "x", "index": 0},
                    {"store_id": store_id, "label": "x", "index": 1},
                ],
            },
        )
        fetch_response = await client.post(
            "/v1/features/fetch", json={"entities": {"store_id": ["ok", store_id]}, "features": ["labels:index"]}
        )
        stored = await fetch(client, entities={"store_id": ["ok"]}, features=["labels:index"])
    assert "NUL" in assert_problem(write_response, 422, "rows[1].store_id")["detail"]
    assert "NUL" in assert_problem(fetch_response, 422, "entities.store_id[1]")["detail"]
    assert stored["rows"][0]["statuses"] == ["MISSING"]  # one bad row refuses the batch


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize("depth", [100_000, 5_000, 1_000, 990, 950, 900, 500, 50])
async def test_deep_nesting_is_refused_quickly(gateway: GatewayFactory, names: Names, depth: int) -> None:
    """Past the decoder's depth limit: 400 at once, no RecursionError (it was a 500); below it: a 422."""
    bodies = [
        ("/v1/features/fetch", b'{"entities": {"consumer_id": [' + nested(depth) + b']}, "features": ["live:*"]}'),
        ("/v1/features/fetch", b'{"entities": {"consumer_id": [1]}, "features": ' + nested(depth) + b"}"),
        ("/v1/features/write", b'{"group": "live", "rows": [{"consumer_id": 1, "name": ' + nested(depth) + b"}]}"),
        ("/v1/features/write", b'{"group": "live", "rows": [{"consumer_id": ' + nested(depth) + b"}]}"),
    ]
    async with gateway(names.registry(names.backend("sqlite"))) as client:
        for n, (path, body) in enumerate(bodies):
            # The CPU the refusal costs this process (the gateway runs in it), not the wall clock, which counts
            # the time other processes had the CPU: descending a body level by level would cost CPU time.
            started = time.process_time()
            response = await client.post(path, headers=JSON, content=body)
            cpu_s = time.process_time() - started
            assert response.status_code in (400, 422), (path, depth, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert len(response.content) < 1000  # the error names the value in a few levels, not all of them
            assert cpu_s < 0.5, (path, depth, cpu_s)
            if depth >= 5_000 and n != 1:  # (`features` is typed: a list there is refused at its first level)
                assert response.json()["detail"] == "the body is nested too deeply"


async def counted(sent: list[int], chunk: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        sent[0] += len(chunk)
        yield chunk


@pytest.mark.parametrize("path", ["/v1/features/fetch", "/v1/features/write"])
async def test_a_huge_body_is_refused_without_being_read(gateway: GatewayFactory, names: Names, path: str) -> None:
    """A declared 50 MB body is refused from its Content-Length before one byte is read; an undeclared one
    (chunked) as soon as the bytes read pass the limit."""
    chunk = b" " * 65536
    declared, streamed = [0], [0]
    async with gateway(names.registry(names.backend("sqlite")), max_body_bytes=1 << 20) as client:
        started = time.process_time()  # what refusing costs this process (the gateway runs in it), not the wall clock
        response = await client.post(
            path, content=counted(declared, chunk, 800), headers={**JSON, "content-length": str(800 * len(chunk))}
        )
        declared_cpu_s = time.process_time() - started
        chunked = await client.post(path, headers=JSON, content=counted(streamed, chunk, 800))
    assert_problem(response, 413, "(body)")
    assert declared[0] == 0, "the body was read although its declared size was over the limit"
    assert declared_cpu_s < 0.5
    assert_problem(chunked, 413, "(body)")
    assert (1 << 20) < streamed[0] <= (1 << 20) + len(chunk), streamed[0]


@pytest.mark.parametrize(
    "stamp",
    [
        "9999-12-31T23:59:59.999999-14:00",  # year 10000 in UTC: it was stored, then every read of it a 500
        "9999-12-31T00:00:00Z",  # its expiry did not fit a datetime: the PostgreSQL write failed with a 503
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC
    ],
)
async def test_event_times_out_of_range_are_refused(
    gateway: GatewayFactory, names: Names, kind: str, stamp: str
) -> None:
    row = {"consumer_id": 1, "lifetime_orders": 1, "lifetime_value": 1.0, "event_timestamp": stamp}
    async with gateway(names.registry(names.backend(kind))) as client:
        response = await client.post("/v1/features/write", json={"group": "history", "rows": [row]})
    assert "out of range" in assert_problem(response, 422, "rows[0].event_timestamp")["detail"]


@pytest.mark.parametrize(
    ("stamp", "served"),
    [
        ("9999-12-29T22:59:59.999999-01:00", "9999-12-29T23:59:59.999999Z"),
        ("0001-01-02T00:00:00Z", "0001-01-02T00:00:00Z"),
        ("1969-07-20T20:17:40Z", "1969-07-20T20:17:40Z"),
    ],
)
async def test_event_times_at_the_edges_are_stored_and_served(
    gateway: GatewayFactory, names: Names, kind: str, stamp: str, served: str
) -> None:
    """With the bound on future event times lifted (a setting), the last day a datetime can hold still works."""
    rows = [{"store_id": "s", "open_orders": 3, "event_timestamp": stamp}]  # `stores` has no ttl
    history = [{"consumer_id": 1, "lifetime_orders": 1, "lifetime_value": 1.0, "event_timestamp": stamp}]
    async with gateway(names.registry(names.backend(kind)), max_future_event_ms=1e15) as client:
        await write(client, "stores", rows)
        await write(client, "history", history)  # a 30 d ttl: the expiry of a year-9999 row is capped
        answer = await fetch(
            client, entities={"store_id": ["s"]}, features=["stores:open_orders"], include_timestamps=True
        )
        with_ttl = await fetch(
            client, entities={"consumer_id": [1]}, features=["history:lifetime_orders"], include_timestamps=True
        )
    assert answer["rows"][0]["values"] == [3]
    assert answer["rows"][0]["event_timestamps"] == [served]
    # The old ones are past their reclaim time (30 d ttl + 1 d grace): MISSING, whether deleted yet or not.
    assert with_ttl["rows"][0]["statuses"] == ["PRESENT" if stamp.startswith("9999") else "MISSING"]


def test_the_server_answers_a_declared_50_mb_body_at_once(tmp_path: Path) -> None:
    """Through uvicorn for real: the 413 comes back while the client has sent only the first bytes.

    The client sends the head and 64 KiB of the declared 50 MB, then nothing more and only waits: an answer
    can come only from a server that did not wait for the body (one waiting for it would never answer, and
    the socket's timeout fails the test)."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(unicode_registry(Names(tmp_path), "sqlite"))
    server = GatewayProcess(registry, tmp_path / "gateway.log")
    declared, sent = 50_000_000, 65536
    try:
        server.start()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/features/write HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % declared + b"[" * sent
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)  # nothing more is sent while waiting: the body is withheld
                assert chunk, f"the connection closed without an answer: {answer!r}"
                answer += chunk
    finally:
        server.stop()
    head = answer.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 413"), head
    assert "content-type: application/problem+json" in head
