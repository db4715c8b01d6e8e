"""The gateway's errors (app/errors.py) as HTTP answers: RFC 9457 problem documents, `application/problem+json`."""

from __future__ import annotations

import logging

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import GatewayError

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


def problem_response(status: int, title: str, detail: str, field: str | None = None) -> JSONResponse:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


_INTERNAL = {
    "type": "about:blank",
    "title": "Internal error",
    "status": 500,
    "detail": "the gateway failed to answer; this is a bug, it was logged",
}


def problem_of(exc: Exception) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, raw headers and body of the problem document an exception is answered with (the fast path's;
    a GatewayError's as gateway_error below writes it, anything else a 500 for the caller to log)."""
    if isinstance(exc, GatewayError):
        status, body, extra = exc.status, msgspec.json.encode(exc.problem()), exc.headers() or {}
    else:
        status, body, extra = 500, msgspec.json.encode(_INTERNAL), {}
    headers = [
        (b"content-type", PROBLEM.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
    ]
    return status, headers, body


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.problem(), status_code=exc.status, media_type=PROBLEM, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"]) or None
        return problem_response(422, "Invalid request", str(first["msg"]), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = problem_response(exc.status_code, str(exc.detail), str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up mid-body (a load generator stopping, a caller's own timeout): nobody reads this.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_INTERNAL, status_code=500, media_type=PROBLEM)
