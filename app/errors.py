"""The gateway's errors. Each maps to one HTTP status and an RFC 9457 problem document.

GatewayError
├── RegistryError          the registry file is invalid (start-up, `check`); names file and field path
├── RequestError (4xx)     the client sent something we will not serve
│   ├── BadRequest         400: body is not JSON, or not an object
│   ├── ValidationFailed   422: a field has the wrong type, an unknown feature, a bad row...
│   └── TooLarge           413: over a configured limit (entities, features, rows, body bytes)
└── ServiceError (5xx)
    ├── StrictDegraded     503: `strict` was asked and a backend failed
    └── BackendFailed      503: a write could not reach its backend

Only `routers/` turns these into HTTP responses; `app/` raises them without knowing HTTP.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500
    title = "Internal error"
    type_slug = "internal"

    def __init__(self, detail: str, *, field: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra or {}

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://feature-gateway.dev/problems/{self.type_slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


class RegistryError(GatewayError):
    title = "Invalid registry"
    type_slug = "invalid-registry"

    def __init__(self, source: str, path: str, reason: str):
        super().__init__(f"{source}: {path}: {reason}", field=path)
        self.source = source
        self.path = path
        self.reason = reason


class RequestError(GatewayError):
    status = 400


class BadRequest(RequestError):
    status = 400
    title = "Malformed request"
    type_slug = "malformed-request"


class ValidationFailed(RequestError):
    status = 422
    title = "Invalid request"
    type_slug = "invalid-request"


class TooLarge(RequestError):
    status = 413
    title = "Request over a limit"
    type_slug = "over-limit"


class ServiceError(GatewayError):
    status = 503


class StrictDegraded(ServiceError):
    title = "Backend unavailable (strict)"
    type_slug = "strict-degraded"


class BackendFailed(ServiceError):
    title = "Backend unavailable"
    type_slug = "backend-unavailable"
