"""An APIRoute served without FastAPI's parameter machinery, for the hot paths.

The endpoint takes the `Request` and returns a `Response` itself (it decodes its own body with msgspec), so
FastAPI's dependency solving and argument validation, about 60 us per request, are skipped; the route is
still an APIRoute, so it is documented in the OpenAPI spec (operation id, tags, models) like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class RawRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        super().__init__(path, endpoint, **kwargs)
        if self.dependant.dependencies:
            # A Depends here would be silently skipped (auth, say): refuse it at start-up instead.
            raise TypeError(f"{path}: a RawRoute endpoint takes only the Request; call what it needs itself")

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint
