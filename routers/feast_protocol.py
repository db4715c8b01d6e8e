"""Feast's feature-server protocol (POST /get-online-features, /write-to-online-store), translated once into
the serving core's typed requests and answered by the same fetch and write paths.

A Feast client changes only its URL. Unlike Feast, statuses are exact and non-present values carry the
group's declared default: EXPIRED is Feast's OUTSIDE_MAX_AGE, MISSING its NOT_FOUND, and a backend that failed
(no Feast equivalent) is INVALID, Feast's status for a value that could not be determined.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.errors import RequestError, ValidationFailed
from app.serving.fetch import Served
from app.serving.plan import Plan
from app.serving.request import FetchRequest, WriteRequest
from app.serving.statuses import Status
from routers.answers import merge_rows

FEAST_STATUS: dict[str, str] = {
    Status.PRESENT: "PRESENT",
    Status.MISSING: "NOT_FOUND",
    Status.EXPIRED: "OUTSIDE_MAX_AGE",
    Status.UNAVAILABLE: "INVALID",
}
EPOCH = "1970-01-01T00:00:00Z"  # Feast's event time for entity columns and values it did not find


class FeastBody(msgspec.Struct):
    # Feast clients send a few fields this gateway has no use for (e.g. query_embedding); they are ignored.
    features: list[str] = []
    entities: dict[str, list[Any]] = {}
    full_feature_names: bool = False
    feature_service: str | None = None


def fetch_request(body: FeastBody, plan_of: Callable[[FetchRequest], Plan]) -> FetchRequest:
    """The fetch a Feast request asks for; `plan_of` resolves it (to check Feast's naming rule). A feature
    service is one of ours by name, and wins over `features`, as in Feast's server."""
    if body.feature_service is not None:
        request = FetchRequest(entities=body.entities, service=body.feature_service)
    else:
        request = FetchRequest(entities=body.entities, features=body.features)
    try:
        plan = plan_of(request)
    except RequestError as exc:  # Feast's field name
        if exc.field == "service":
            exc.field = "feature_service"
        raise
    check_name_collisions(plan.features, body.full_feature_names)
    if plan.context:
        # Feast sends the request data of on-demand views among the entity columns
        request.entities = {k: v for k, v in body.entities.items() if k not in plan.context}
        request.context = {k: v for k, v in body.entities.items() if k in plan.context}
    return request


def encode_answer(body: FeastBody, served: Served) -> bytes:
    """Feast's columnar answer: the entity columns, then one column per feature with Feast's status names."""
    rows = merge_rows(served, timestamps=True)
    names = list(body.entities)
    results: list[dict[str, Any]] = [
        {"values": ids, "statuses": [FEAST_STATUS[Status.PRESENT]] * len(ids), "event_timestamps": [EPOCH] * len(ids)}
        for ids in body.entities.values()
    ]
    for j, ref in enumerate(served.plan.features):
        group, _, feature = ref.partition(":")
        names.append(f"{group}__{feature}" if body.full_feature_names else feature)
        results.append(
            {
                "values": [row["values"][j] for row in rows],
                "statuses": [FEAST_STATUS[row["statuses"][j]] for row in rows],
                "event_timestamps": [row["event_timestamps"][j] or EPOCH for row in rows],
            }
        )
    return msgspec.json.encode({"metadata": {"feature_names": names}, "results": results})


def check_name_collisions(refs: Sequence[str], full_feature_names: bool) -> None:
    """Feast's rule (feature_store._validate_feature_refs): the columns of an answer have distinct names.

    Without full names, two groups' features of one name would be two columns `v`, `v` that a client can only
    tell apart by position (a pandas frame keeps one); with them, a ref asked twice is the collision.
    """
    counts = Counter(ref if full_feature_names else ref.partition(":")[2] for ref in refs)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if not repeated:
        return
    shown = ", ".join(name.replace(":", "__") for name in repeated)
    advice = (
        "ensure that the features in question have different names"
        if full_feature_names
        else "either use the full feature name by setting 'full_feature_names=True', or ensure that the features "
        "in question have different names"
    )
    raise ValidationFailed(
        f"Duplicate features named {shown} found. To resolve this collision, {advice}.", field="features"
    )


_NAIVE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?", re.ASCII)  # Python's isoformat(), no offset
EVENT_TIMESTAMP = "event_timestamp"


class FeastWriteBody(msgspec.Struct):
    feature_view_name: str
    df: dict[str, list[Any]]
    allow_registry_cache: bool = True
    transform_on_write: bool = True


def write_request(body: FeastWriteBody) -> WriteRequest:
    """Feast's POST /write-to-online-store (columnar `df`) -> our write body (rows), validated by the write path.

    Feast sends naive UTC `event_timestamp`s, which our RFC 3339 parser refuses (a time without offset is
    ambiguous in general): here they are Feast's convention, so they get their `Z`. It also sends a `created`
    column, which we ignore.
    """
    columns = {k: v for k, v in body.df.items() if k != "created"}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValidationFailed("every column of df needs the same length", field="df")
    count = lengths.pop() if lengths else 0
    times = columns.get(EVENT_TIMESTAMP)
    if times is not None:
        columns[EVENT_TIMESTAMP] = [t + "Z" if isinstance(t, str) and _NAIVE.fullmatch(t) else t for t in times]
    rows = [{name: values[i] for name, values in columns.items()} for i in range(count)]
    return WriteRequest(group=body.feature_view_name, rows=rows)
