"""GET /v1/registry: what can be fetched, where it lives, its ttl and defaults."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.auth import visible_registry
from routers.deps import GatewayDep, ReadKey
from routers.models import AUTH_RESPONSES, RegistryDocument

router = APIRouter()


@router.get(
    "/v1/registry",
    operation_id="get_registry",
    tags=["registry"],
    summary="The feature registry",
    response_model=RegistryDocument,
    responses=AUTH_RESPONSES,
)
async def get_registry(gateway: GatewayDep, key: ReadKey) -> dict[str, Any]:
    """A key limited to some feature groups sees only those (and their entities and backends)."""
    return visible_registry(gateway.registry, None if key is None else key.groups)
