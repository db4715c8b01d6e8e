"""The status page at `/` (one static HTML file, no build step) and the JSON it polls, GET /v1/status.

The page holds no data, so it is served without an API key (like /docs); it asks for a key and sends it to
/v1/status, which needs one with the read scope and no group limit when keys are configured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from app.auth import check_every_group
from app.serving.usage import UsageCounts
from app.streams.report import streams_report
from routers.deps import GatewayDep, ReadKey
from routers.models import AUTH_RESPONSES, StatusReport

router = APIRouter()
PAGE = (Path(__file__).parent / "static" / "status.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def status_page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@router.get(
    "/v1/status",
    response_model=StatusReport,
    operation_id="get_status",
    tags=["observability"],
    summary="What the status page shows: registry, backends with latency series, default rates",
    responses=AUTH_RESPONSES,
)
async def get_status(gateway: GatewayDep, key: ReadKey) -> dict[str, Any]:
    """Needs the read scope on a key that is not limited to some feature groups (it shows all of them)."""
    if key is not None:
        check_every_group(key.groups, "/v1/status")
    merged = gateway.metrics.merged()
    backends: dict[str, Any] = {}
    for name, backend in gateway.backends.items():
        points = sorted(merged.series.get(name, {}).items())
        reads = {o: c for (b, o), c in merged.backend_outcomes.items() if b == name}
        backends[name] = {
            "type": backend.type,
            "circuit": gateway.breakers[name].read.state,
            "write_circuit": gateway.breakers[name].write.state,
            "migrated": gateway.migrated[name],
            "reads": reads,
            # [window start (unix s), reads, mean ms, max ms]
            "series": [
                [w, int(c), round(total / c, 3) if c else 0.0, round(worst, 3)] for w, (c, total, worst) in points
            ],
        }
    usage = merged.feature_usage()
    groups: dict[str, Any] = {}
    for group in gateway.registry.groups.values():
        totals = UsageCounts()
        for feature in group.features:
            totals.add(usage.get((group.name, feature.index)) or UsageCounts())
        groups[group.name] = {
            "values": totals.values,
            "statuses": totals.by_status(),
            "default_rate": totals.default_rate(),
        }
    registry = gateway.registry
    services: dict[str, Any] = {name: UsageCounts() for name in registry.services}
    for (service, _), counts in merged.models.items():
        services.setdefault(service, UsageCounts()).add(counts)
    return {
        "now": time.time(),
        "started": gateway.metrics.started,
        "registry": registry.describe(),
        "backends": backends,
        "load": load_report(merged.loads),
        "groups": groups,
        "services": {
            name: {
                "features": len(registry.services[name].refs) if name in registry.services else None,
                "requests": counts.requests,
                "values": counts.values,
                "statuses": counts.by_status(),
                "default_rate": counts.default_rate(),
            }
            for name, counts in services.items()
        },
        "streams": streams_report(registry, gateway.freshness, merged),
    }


def load_report(loads: list[dict[str, float]]) -> dict[str, Any]:
    """Every worker's load (Gateway.load) in one: limits and in-flight counts add up, lag is the worst."""
    return {
        "workers": len(loads),
        "limit": int(sum(w["limit"] for w in loads)),
        "inflight": int(sum(w["inflight"] for w in loads)),
        "shed": {work: int(sum(w[f"shed_{work}s"] for w in loads)) for work in ("read", "write")},
        "loop_lag_ms": round(max((w["lag_ms"] for w in loads), default=0.0), 3),
    }
