"""GET /v1/registry: what can be fetched, where it lives, its ttl and defaults."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routers.deps import GatewayDep
from routers.models import RegistryDocument

router = APIRouter()


@router.get(
    "/v1/registry",
    operation_id="get_registry",
    tags=["registry"],
    summary="The feature registry",
    response_model=RegistryDocument,
)
async def get_registry(gateway: GatewayDep) -> dict[str, Any]:
    return gateway.registry.describe()
