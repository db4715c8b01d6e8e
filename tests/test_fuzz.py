"""Schemathesis fuzzes every operation of the served OpenAPI spec against the app on Redis, PostgreSQL and
SQLite: never a 500, answers that conform to the documented schemas, status codes and media types, every
error as application/problem+json, and bodies that break the schema refused with a 4xx. API keys are on, as
in production: every case carries an admin key, unless it is the header schemathesis set out to break
(then the answer must be a 401).

The spec cannot say which join keys, groups and features exist (they come from the registry), so about half
of the schema-valid bodies are steered onto the registry's names, with ids and values of the right dtype
(any value, edge cases included) or, in half of those, of any JSON type: that is what reaches the backends.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta, timezone
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth import key_entry, new_token
from app.main import DEMO_REGISTRY, create_app
from app.registry.load import parse_registry
from app.registry.model import Entity, Group, Registry
from app.settings import Settings
from app.storage.codec import DType
from tests.support.registries import Names

EXAMPLES = 80  # per operation and generation mode: about 10 s in all on a 2-core box
INT64 = 1 << 63


@schemathesis.check
def errors_are_problem_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error answer is RFC 9457 problem details (only /readyz answers 503 with its own document)."""
    if response.status_code >= 400 and case.path != "/readyz":
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type == "application/problem+json", f"{response.status_code} sent as {content_type!r}"
    return None


# The deadlines of the demo's services (a fetch by service without deadline_ms has its service's)
SERVICE_DEADLINES = {s.name: s.deadline_ms for s in parse_registry(DEMO_REGISTRY.read_text(), env={}).services.values()}


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except the documented 503s of a fetch with a short deadline: `strict` when a backend missed it, and
    overload when the request spent more than what was left of it before it could start: a millisecond or two of
    a tiny deadline, or a stall of the loaded test process past a service's 30 ms."""
    body = case.body if isinstance(case.body, dict) else {}
    if response.status_code == 503 and response.json().get("type", "").endswith("/overload"):
        deadline = body.get("deadline_ms")
        if deadline is None and isinstance(body.get("service"), str):
            service_deadline = SERVICE_DEADLINES.get(body["service"])
            assert service_deadline is not None, response.text
            assert service_deadline <= 50, response.text
            return None
        assert isinstance(deadline, int | float), response.text
        assert deadline <= 5, response.text
        return None
    if response.status_code == 503 and body.get("strict") is True:
        assert response.json()["type"].endswith("/strict-degraded"), response.text
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    errors_are_problem_json,
]


def fuzz_registry(names: Names) -> str:
    """The demo registry (whose names the spec's examples use) on Redis, PostgreSQL and SQLite."""
    text = DEMO_REGISTRY.read_text()
    text = re.sub(r"(?m)^  hot: .*$", f"  hot: {names.backend('redis')}", text)
    bulk = f"  bulk: {names.backend('cockroach')}\n  local: {names.backend('sqlite')}"
    text = re.sub(r"(?m)^  bulk: .*$", bulk, text)
    return text.replace("backend: bulk\n    ttl: 7d", "backend: local\n    ttl: 7d")


@dataclass
class Api:
    schema: Any
    registry: Registry
    token: str  # an admin API key: the fuzz runs with authentication on, as in production


@pytest.fixture
def api(names: Names) -> Iterator[Api]:
    registry = parse_registry(fuzz_registry(names), "fuzz-registry", env={})
    assert {g.backend for g in registry.groups.values()} == {"hot", "bulk", "local"}
    token = new_token()
    settings = Settings(
        max_entities=20, max_features=40, max_write_rows=20, api_keys=json.dumps([key_entry("fuzz", token, ["admin"])])
    )
    app = create_app(settings, registry=registry)
    yield Api(schemathesis.openapi.from_asgi("/openapi.json", app), registry, token)
    shutdown_lifespans()  # closes the app's backends before the per-test cleanup drops their data


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def maybe(right: st.SearchStrategy[Any], noisy: bool) -> st.SearchStrategy[Any]:
    """Noisy: the right kind of value 7 times in 10, else null or any JSON value. Else the right kind."""
    if not noisy:
        return right
    return st.integers(0, 9).flatmap(lambda k: right if k < 7 else st.none() if k < 8 else ANY_JSON)


def value_of(dtype: DType, noisy: bool) -> st.SearchStrategy[Any]:
    finite = st.floats(allow_nan=False, allow_infinity=False)
    right: st.SearchStrategy[Any] = {
        "int64": st.integers(-INT64, INT64 - 1),
        "float64": finite,
        "bool": st.booleans(),
        "string": st.text(),
        "bytes": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    }.get(dtype.kind, st.nothing())
    if dtype.kind == "array":
        item = st.integers(-INT64, INT64 - 1) if dtype.item == "q" else finite
        right = st.lists(item, min_size=dtype.length, max_size=dtype.length)
    return maybe(st.none() | right, noisy)


def id_of(entity: Entity, noisy: bool) -> st.SearchStrategy[Any]:
    if entity.dtype.kind == "int64":
        return maybe(st.integers(0, 5) | st.integers(-INT64, INT64 - 1), noisy)
    return maybe(
        st.sampled_from(["s1", "s2"]) | st.text(min_size=1, max_size=256).filter(lambda t: "\x00" not in t), noisy
    )


def steer_fetch(body: dict[str, Any], registry: Registry, data: st.DataObject) -> None:
    noisy = data.draw(st.booleans())
    refs = [f"{g}:*" for g in registry.groups] + [f.ref for g in registry.groups.values() for f in g.features]
    body["features"] = data.draw(st.lists(st.sampled_from(refs), min_size=1, max_size=6))
    entities = {registry.groups[ref.partition(":")[0]].entity for ref in body["features"]}
    rows = data.draw(st.integers(1, 5))
    body["entities"] = {
        e.join_key: data.draw(st.lists(id_of(e, noisy), min_size=rows, max_size=rows)) for e in entities
    }


def steer_write(body: dict[str, Any], registry: Registry, data: st.DataObject) -> None:
    noisy = data.draw(st.booleans())
    group: Group = data.draw(st.sampled_from(list(registry.groups.values())))
    offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
    stamps = st.datetimes(timezones=st.none() | offsets.map(timezone)).map(lambda d: d.isoformat())
    body["group"] = group.name
    body["rows"] = []
    for _ in range(data.draw(st.integers(1, 4))):
        row = {group.entity.join_key: data.draw(id_of(group.entity, noisy))}
        row.update({f.name: data.draw(value_of(f.dtype, noisy)) for f in group.features})
        if data.draw(st.booleans()):
            row["event_timestamp"] = data.draw(maybe(stamps, noisy) | st.text(max_size=30) if noisy else stamps)
        body["rows"].append(row)


STEER = {"fetch_features": steer_fetch, "write_features": steer_write}


Seen = Counter[tuple[str, str, int]]


def fuzz(api: Api, strategy: st.SearchStrategy[Any], mode: str, steer: Any, seen: Seen) -> None:
    examples = 10 if mode == "example" else EXAMPLES  # the spec's examples vary only in their headers

    @given(case=strategy, data=st.data())
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: Any, data: st.DataObject) -> None:
        label = mode
        header = case.meta.components.get(ParameterLocation.HEADER) if case.meta is not None else None
        if header is None or header.mode != GenerationMode.NEGATIVE:
            # Valid credentials unless the case is about breaking them (then the answer must be a 401).
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {api.token}"}
        if mode == "positive" and steer is not None and isinstance(case.body, dict) and data.draw(st.booleans()):
            case.body = copy.deepcopy(case.body)  # it may be the spec's own example object: never edit that
            steer(case.body, api.registry, data)
            label = "steered"
        response = case.call_and_validate(checks=CHECKS)
        seen[(case.operation.label, label, response.status_code)] += 1

    run()


def test_every_operation(api: Api) -> None:
    operations = [result.ok() for result in api.schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/features/fetch", "POST /v1/features/write", "GET /v1/registry", "GET /readyz"} <= labels
    seen: Seen = Counter()
    for operation in operations:
        steer = STEER.get(operation.definition.raw.get("operationId", ""))
        fuzz(api, operation.as_strategy(generation_mode=GenerationMode.POSITIVE), "positive", steer, seen)
        if operation.body:
            fuzz(api, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE), "negative", None, seen)
            for strategy in api.schema.get_strategies_from_examples(operation):
                fuzz(api, strategy, "example", None, seen)
    print("\nschemathesis answers (operation, mode, status): count")
    for key, count in sorted(seen.items()):
        print(f"  {key}: {count}")
    # The steered bodies reached the backends: writes stored rows and fetches answered with them.
    assert seen[("POST /v1/features/write", "steered", 200)] > 0, seen
    assert seen[("POST /v1/features/fetch", "steered", 200)] > 0, seen
    assert seen[("POST /v1/features/fetch", "example", 200)] > 0, seen


async def test_errors_are_documented_as_problem_json() -> None:
    spec = create_app(Settings()).openapi()
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/readyz":
                    assert list(response["content"]) == ["application/problem+json"], (path, status)
                    assert response["content"]["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }
