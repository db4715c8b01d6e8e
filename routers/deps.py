"""Dependency accessors shared by the routers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from starlette.types import Scope as AsgiScope

from app.auth import ApiKey, KeyRing, Scope
from app.serving.gateway import Gateway


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_gateway(request: Request) -> Gateway:
    # async: FastAPI runs a plain `def` dependency in a thread pool, a thread hop on every request.
    return gateway_of(request)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


SCHEME = "bearerAuth"  # the bearer security scheme's name in the OpenAPI spec


def authorize(request: Request, scope: Scope | None) -> ApiKey | None:
    """The caller's API key, checked for `scope` (None: any valid key); None when authentication is off.

    Raises Unauthorized (401) or Forbidden (403). RawRoutes (the hot paths) call this first thing; other
    routes take it as a dependency (AnyKey, ReadKey, ...).
    """
    return authorize_scope(request.app.state.keyring, request.scope, scope)


def authorize_scope(keyring: KeyRing, asgi_scope: AsgiScope, scope: Scope | None) -> ApiKey | None:
    """authorize on the raw ASGI call (the fast path has no Request)."""
    if not keyring.enabled:
        return None
    # The raw ASGI headers (names are lowercase bytes), not request.headers: building that costs more than
    # the whole check when nothing else on the path needs it.
    for name, value in asgi_scope["headers"]:
        if name == b"authorization":
            return keyring.check(value.decode("latin-1"), scope)
    return keyring.check(None, scope)


def security(scope: Scope | None) -> dict[str, Any]:
    """`openapi_extra` saying a RawRoute needs a key with `scope` (BearerKey routes declare the scheme itself)."""
    return {"security": [{SCHEME: [] if scope is None else [scope]}]}


class BearerKey(SecurityBase):
    """`authorize` as a dependency, for `scope` (None: any valid key).

    It is a SecurityBase so the OpenAPI spec declares the bearer scheme, and that the route needs it (so
    generated SDKs send the header). It answers the caller's ApiKey, or None when authentication is off.
    """

    def __init__(self, scope: Scope | None):
        self.model = HTTPBearerModel(
            bearerFormat="fgk_<43 base64url characters> (feature-gateway keys new)",
            description="An API key. Scopes: read (fetch, registry), write (write), admin (everything).",
        )
        self.scheme_name = SCHEME
        self.scope: Scope | None = scope

    async def __call__(self, request: Request) -> ApiKey | None:
        return authorize(request, self.scope)


# `scopes` only documents the scope in the spec (OpenAPI 3.1 lists roles for http schemes); BearerKey checks it.
AnyKey = Annotated[ApiKey | None, Security(BearerKey(None))]
ReadKey = Annotated[ApiKey | None, Security(BearerKey("read"), scopes=["read"])]
WriteKey = Annotated[ApiKey | None, Security(BearerKey("write"), scopes=["write"])]
AdminKey = Annotated[ApiKey | None, Security(BearerKey("admin"), scopes=["admin"])]
