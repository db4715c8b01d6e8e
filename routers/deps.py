"""Dependency accessors shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import TooLarge
from app.gateway import Gateway


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_gateway(request: Request) -> Gateway:
    # async: FastAPI runs a plain `def` dependency in a thread pool, a thread hop on every request.
    return gateway_of(request)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (not after buffering all of it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {declared} bytes; the limit is {limit}", field="(body)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes", field="(body)")
        chunks.append(chunk)
    return b"".join(chunks)
