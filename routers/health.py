"""GET /healthz (the process answers; never needs an API key) and /readyz (every backend answers; needs any key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from routers.deps import AnyKey, GatewayDep
from routers.models import AUTH_RESPONSES, Health, Readiness

router = APIRouter()


@router.get("/healthz", operation_id="health", tags=["health"], summary="The process is alive", response_model=Health)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="ready",
    tags=["health"],
    summary="Every backend answers",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a backend does not answer"}, **AUTH_RESPONSES},
)
async def ready(gateway: GatewayDep, _key: AnyKey) -> JSONResponse:
    answers = await gateway.readiness()
    ready = all(a is None for a in answers.values())
    body: dict[str, object] = {
        "ready": ready,
        "backends": {n: a or "ok" for n, a in answers.items()},
        "circuits": {n: b.read.state for n, b in gateway.breakers.items()},
        "write_circuits": {n: b.write.state for n, b in gateway.breakers.items()},
    }
    if not ready:
        body["detail"] = "not answering: " + ", ".join(n for n, a in answers.items() if a is not None)
    return JSONResponse(body, status_code=200 if ready else 503)
