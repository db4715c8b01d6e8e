"""The hot routes served as plain ASGI, ahead of FastAPI's router and middleware stack.

Measured on 1 x 100 fetches: Starlette's and FastAPI's layers (error, telemetry and body-limit middleware,
the router's path matching over every route, the Request and Response objects and their send wrappers) took
about a fifth of the worker's busy time before the endpoint ran. Here a request for a hot route goes through
the same two middleware of ours that every route has (RequestMetrics: counted and timed by route;
AdmissionControl: a slot of the limiter), then straight to the route's function of the raw call, the one the
FastAPI route declared in routers/features.py (or routers/feast.py) also calls, so the OpenAPI spec,
authentication and limits are the same on both paths. Errors become the same problem documents as
routers/errors.py's handlers write.

A browser's request (it carries `Origin`) takes the full stack, where CORS answers it. So do routes' other
methods, which FastAPI answers 405.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from routers.admission import AdmissionControl
from routers.answers import Reply
from routers.errors import problem_of
from routers.observability import RequestMetrics

log = logging.getLogger(__name__)

Endpoint = Callable[[Scope, Receive], Awaitable[Reply]]


class _Endpoints:
    """The innermost app of the fast path: the route's function, its Reply or its error sent as is."""

    def __init__(self, routes: dict[str, Endpoint]):
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            reply = await self.routes[scope["path"]](scope, receive)
        except ClientDisconnect:
            # The client hung up mid-body: nobody reads an answer (the full stack's handler says 499 too)
            await send({"type": "http.response.start", "status": 499, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        except Exception as exc:
            status, headers, body = problem_of(exc)
            if status == 500:
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": reply.raw_headers()})
        await send({"type": "http.response.body", "body": reply.content})


class GatewayApp(FastAPI):
    """FastAPI with the fast path in front: `fast_routes` (POST, no `Origin`) go to their function inside our
    own middleware; everything else to FastAPI as usual. Ahead of FastAPI.__call__ too, whose own telemetry
    check alone (a tracer provider lookup through os.environ) cost 1.6% of the busy time per request."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fast_routes: dict[str, Endpoint] = {}
        self._hot: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.fast_routes and scope["method"] == "POST":
            for name, _ in scope["headers"]:
                if name == b"origin":
                    break
            else:
                hot = self._hot
                if hot is None:  # routes are all added by the first request
                    hot = self._hot = RequestMetrics(AdmissionControl(_Endpoints(self.fast_routes)))
                scope["app"] = self  # what routers read their state from, as Starlette sets it
                await hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
