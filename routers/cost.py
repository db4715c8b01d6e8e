"""GET /v1/cost: what each group holds where, what it costs a month, and how much it is used (app/tiering/cost.py)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from app.tiering.cost import CostMeter, as_json, cost_report
from routers.deps import GatewayDep, ReadKey
from routers.models import AUTH_RESPONSES, CostReport

router = APIRouter()


@router.get(
    "/v1/cost",
    response_model=CostReport,
    operation_id="get_cost",
    tags=["observability"],
    summary="Per group and backend: bytes held, monthly cost, requests per day, default rate, unused features",
    responses=AUTH_RESPONSES,
)
async def get_cost(request: Request, gateway: GatewayDep, key: ReadKey) -> dict[str, Any]:
    """Bytes are measured by the backends and kept 60 s; a backend that cannot be measured has an error and the
    rest still answer. A key limited to some feature groups sees only those, and the backends holding them
    (their totals over its groups)."""
    meter: CostMeter = request.app.state.costs
    measurements = await meter.measure(gateway.backends, gateway.registry)
    report = cost_report(
        gateway.registry,
        measurements,
        gateway.metrics.merged().feature_usage(),
        started=gateway.metrics.started,
        now=time.time(),
        groups=None if key is None else key.groups,
        policy=meter.policy,
    )
    return as_json(report)
