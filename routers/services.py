"""GET /v1/services: the feature services (one per model) with their resolved features and defaults."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.errors import NotFound
from app.registry.model import Registry, Service
from routers.deps import GatewayDep, ReadKey
from routers.models import AUTH_RESPONSES, ServiceDocument, ServiceList, problems

router = APIRouter(prefix="/v1/services", tags=["registry"])


def _readable(registry: Registry, service: Service, groups: frozenset[str] | None) -> bool:
    """A key limited to some groups sees the services that read only those."""
    return groups is None or registry.service_groups(service) <= groups


@router.get(
    "",
    operation_id="list_services",
    summary="The feature services",
    response_model=ServiceList,
    responses=AUTH_RESPONSES,
)
async def list_services(gateway: GatewayDep, key: ReadKey) -> dict[str, Any]:
    registry = gateway.registry
    groups = None if key is None else key.groups
    return {
        "services": [registry.describe_service(s) for s in registry.services.values() if _readable(registry, s, groups)]
    }


@router.get(
    "/{name}",
    operation_id="get_service",
    summary="One feature service",
    response_model=ServiceDocument,
    responses={**AUTH_RESPONSES, **problems(status_404="no service of that name")},
)
async def get_service(name: str, gateway: GatewayDep, key: ReadKey) -> dict[str, Any]:
    registry = gateway.registry
    service = registry.services.get(name)
    # One answer for an unknown service and one a group-limited key may not see: it learns no names
    if service is None or not _readable(registry, service, None if key is None else key.groups):
        raise NotFound(f"no service {name!r}", field="name")
    return registry.describe_service(service)
