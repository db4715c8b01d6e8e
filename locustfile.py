"""Load test for feature-gateway (locust, FastHttpUser).

    locust -f locustfile.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:8000

The mix, per simulated user, with no pause between requests (an online model calls as fast as it is served):
  80%  fetch of 1 entity     (scoring one request)
  12%  fetch of 10 entities  (a small ranking)
   5%  fetch of 100 entities (a candidate list)
   3%  write of 1 to 10 rows of one group (a streaming pipeline's updates)
Writes use random values of each feature's dtype, learnt from GET /v1/registry, and the current time.

Every answer is checked, not only its HTTP status: a fetch must be a 200 with one row per entity asked, one
value and one status per feature, and every status one of PRESENT, MISSING, EXPIRED, UNAVAILABLE; a write
must be a 200 whose written + skipped_stale is the number of rows sent.

A *degraded* fetch (a backend failed or missed the deadline, its values served as defaults with UNAVAILABLE)
is counted as a failure, although its HTTP status is 200: the model got defaults instead of features, and
that is what a load test is there to find (typically the deadline is too tight for the load). Set
FG_LOAD_DEGRADED_OK=1 to count them as successes, when testing how the gateway sheds a slow backend.

A `503 overload` answer (the gateway is serving all it can without missing deadlines and refused this one at
once, before reading it) is a failure of its own name, `503 overload: refused at once, retried after
Retry-After`, and the user waits the Retry-After it was given before its next request, as a well-behaved
client does: it says the load is more than the box serves, not that anything is broken.

Configuration (environment; the defaults fit the demo registry of `scripts/serve`):
  FG_LOAD_FEATURES     features to fetch, comma-separated   [consumer_live:*,consumer_history:*]
  FG_LOAD_IDS          entity ids: a range 1-5000 or a list a,b,c   [101-200; the demo has data for 101-105]
  FG_LOAD_WRITE_GROUP  group to write; `none` for a read-only test   [the group of the first feature]
  FG_LOAD_DEADLINE_MS  deadline_ms sent with each fetch            [the gateway's default]
  FG_LOAD_TOKEN        API key, sent as `Authorization: Bearer <token>`  [none]
  FG_LOAD_WAIT_MS      pause between one user's requests            [0]
  FG_LOAD_DEGRADED_OK  1: a degraded fetch is not a failure          [0]
"""

from __future__ import annotations

import base64
import os
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from locust import FastHttpUser, task
from locust.contrib.fasthttp import ResponseContextManager

STATUSES = frozenset({"PRESENT", "MISSING", "EXPIRED", "UNAVAILABLE"})
_ARRAY = re.compile(r"^(float32|float64|int64)\[(\d+)\]$")
_WORDS = ("thai", "pizza", "sushi", "ramen", "tacos", "curry", "salad", "burger")


class LoadConfigError(RuntimeError):
    """An FG_LOAD_* setting does not fit the gateway's registry."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


FEATURES = [f.strip() for f in _env("FG_LOAD_FEATURES", "consumer_live:*,consumer_history:*").split(",") if f.strip()]
IDS = _env("FG_LOAD_IDS", "101-200")
WRITE_GROUP = _env("FG_LOAD_WRITE_GROUP", FEATURES[0].split(":")[0] if FEATURES else "none")
DEADLINE_MS = float(os.environ["FG_LOAD_DEADLINE_MS"]) if os.environ.get("FG_LOAD_DEADLINE_MS") else None
TOKEN = os.environ.get("FG_LOAD_TOKEN", "").strip()
WAIT_S = float(_env("FG_LOAD_WAIT_MS", "0")) / 1000
DEGRADED_OK = _env("FG_LOAD_DEGRADED_OK", "0") not in ("0", "false", "no")


def parse_ids(text: str, dtype: str) -> list[Any]:
    """`1-5000` (int64 entities) or `a,b,c`, typed by the entity's dtype."""
    match = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", text)
    if match and dtype == "int64":
        low, high = int(match[1]), int(match[2])
        if high < low:
            raise LoadConfigError(f"FG_LOAD_IDS={text!r}: the range is empty")
        return list(range(low, high + 1))
    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items:
        raise LoadConfigError("FG_LOAD_IDS is empty")
    if dtype != "int64":
        return items
    try:
        return [int(i) for i in items]
    except ValueError:
        raise LoadConfigError(f"FG_LOAD_IDS={text!r}: these entities have int64 ids") from None


def sample(dtype: str, rng: random.Random) -> Any:
    """A random value of a feature dtype, as JSON."""
    if dtype == "bool":
        return rng.random() < 0.5
    if dtype == "int64":
        return rng.randrange(0, 1000)
    if dtype == "float64":
        return round(rng.uniform(0, 100), 3)
    if dtype == "string":
        return rng.choice(_WORDS)
    if dtype == "bytes":
        return base64.b64encode(rng.randbytes(8)).decode()
    match = _ARRAY.match(dtype)
    if match is None:
        raise LoadConfigError(f"cannot make values of dtype {dtype!r}")
    length = int(match[2])
    if match[1] == "int64":
        return [rng.randrange(-100, 100) for _ in range(length)]
    return [round(rng.uniform(-1, 1), 4) for _ in range(length)]


@dataclass(frozen=True)
class Plan:
    """What to ask for, worked out once from the registry the gateway serves."""

    join_key: str
    ids: list[Any]
    write_group: str | None
    write_features: dict[str, str]  # feature -> dtype


def make_plan(registry: dict[str, Any]) -> Plan:
    groups, entities = registry["groups"], registry["entities"]
    if not FEATURES:
        raise LoadConfigError("FG_LOAD_FEATURES is empty")
    entity_names = set()
    for ref in FEATURES:
        group, _, feature = ref.partition(":")
        if group not in groups:
            raise LoadConfigError(f"FG_LOAD_FEATURES: no group {group!r}; the gateway has {', '.join(groups)}")
        if feature != "*" and feature not in groups[group]["features"]:
            raise LoadConfigError(f"FG_LOAD_FEATURES: group {group} has no feature {feature!r}")
        entity_names.add(groups[group]["entity"])
    if len(entity_names) != 1:
        raise LoadConfigError(f"FG_LOAD_FEATURES: features of one entity please, not {sorted(entity_names)}")
    entity = entities[entity_names.pop()]
    write_group: str | None = None if WRITE_GROUP.lower() == "none" else WRITE_GROUP
    write_features: dict[str, str] = {}
    if write_group is not None:
        if write_group not in groups:
            raise LoadConfigError(f"FG_LOAD_WRITE_GROUP: no group {write_group!r}")
        if entities[groups[write_group]["entity"]]["join_key"] != entity["join_key"]:
            raise LoadConfigError("FG_LOAD_WRITE_GROUP: its entity is not the one of FG_LOAD_FEATURES")
        write_features = {name: spec["dtype"] for name, spec in groups[write_group]["features"].items()}
    return Plan(entity["join_key"], parse_ids(IDS, entity["dtype"]), write_group, write_features)


_plan: Plan | None = None
OVERLOAD = "503 overload: refused at once, retried after Retry-After"


def retry_after(response: ResponseContextManager) -> float | None:
    """The pause a 503 overload answer asks for (None: not one)."""
    if response.status_code != 503 or "/overload" not in (response.text or ""):
        return None
    value = response.headers.get("retry-after") if response.headers else None
    try:
        return float(str(value or 1))
    except ValueError:
        return 1.0


class FeatureClient(FastHttpUser):
    backoff_s = 0.0  # set by a 503 overload: the next wait is at least this

    def wait_time(self) -> float:
        wait, self.backoff_s = max(WAIT_S, self.backoff_s), 0.0
        return wait

    def refused(self, response: ResponseContextManager) -> bool:
        pause = retry_after(response)
        if pause is None:
            return False
        self.backoff_s = pause
        response.failure(OVERLOAD)  # type: ignore[no-untyped-call]
        return True

    default_headers = {"authorization": f"Bearer {TOKEN}"} if TOKEN else None

    def on_start(self) -> None:
        global _plan
        self.rng = random.Random()
        if _plan is None:
            with self.client.get("/v1/registry", name="registry", catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"GET /v1/registry answered {response.status_code}: {response.text[:200]}")
                    raise LoadConfigError(f"cannot read the registry: HTTP {response.status_code}")
                _plan = make_plan(response.json())
        self.plan = _plan

    def fetch(self, n: int) -> None:
        ids = self.plan.ids
        chosen = self.rng.sample(ids, n) if len(ids) >= n else self.rng.choices(ids, k=n)
        body: dict[str, Any] = {"entities": {self.plan.join_key: chosen}, "features": FEATURES}
        if DEADLINE_MS is not None:
            body["deadline_ms"] = DEADLINE_MS
        with self.client.post("/v1/features/fetch", json=body, name=f"fetch {n}", catch_response=True) as response:
            if self.refused(response):
                return
            problem = check_fetch(response, n)
            if problem:
                response.failure(problem)

    @task(80)
    def fetch_one(self) -> None:
        self.fetch(1)

    @task(12)
    def fetch_ten(self) -> None:
        self.fetch(10)

    @task(5)
    def fetch_hundred(self) -> None:
        self.fetch(100)

    @task(0 if WRITE_GROUP.lower() == "none" else 3)
    def write(self) -> None:
        plan = self.plan
        if plan.write_group is None:
            return
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        rows = [
            {
                plan.join_key: self.rng.choice(plan.ids),
                "event_timestamp": now,
                **{name: sample(dtype, self.rng) for name, dtype in plan.write_features.items()},
            }
            for _ in range(self.rng.randint(1, 10))
        ]
        body = {"group": plan.write_group, "rows": rows}
        with self.client.post("/v1/features/write", json=body, name="write", catch_response=True) as response:
            if self.refused(response):
                return
            problem = check_write(response, len(rows))
            if problem:
                response.failure(problem)


def check_fetch(response: ResponseContextManager, entities: int) -> str | None:
    """Why a fetch answer is wrong, or None."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {(response.text or '')[:200]}"
    try:
        body = response.json()
        features, rows = body["features"], body["rows"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"not a fetch answer: {exc}"
    if len(rows) != entities:
        return f"{len(rows)} rows for {entities} entities"
    width = len(features)
    for row in rows:
        statuses = row.get("statuses", ())
        if len(statuses) != width or len(row.get("values", ())) != width:
            return f"a row has {len(statuses)} statuses for {width} features"
        if not STATUSES.issuperset(statuses):
            return f"unknown status in {statuses}"
    if body.get("degraded") and not DEGRADED_OK:
        failed = sorted(name for name, b in body.get("backends", {}).items() if b.get("status") != "ok")
        return f"degraded: {', '.join(failed) or 'a backend'} failed or missed the deadline"
    return None


def check_write(response: ResponseContextManager, rows: int) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {(response.text or '')[:200]}"
    try:
        body = response.json()
        counted = body["written"] + body["skipped_stale"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"not a write answer: {exc}"
    if counted != rows:
        return f"{counted} rows counted (written + skipped_stale) for {rows} sent"
    return None
