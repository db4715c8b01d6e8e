"""The gateway's errors. Each maps to one HTTP status and an RFC 9457 problem document.

GatewayError
├── RegistryError          the registry file is invalid (start-up, `check`); names file and field path
├── KeyConfigError         the API key config is invalid (start-up); names its source and field path
├── ReloadRefused          422: a reload found one of those invalid and changed nothing; names file and field path
├── RequestError (4xx)     the client sent something we will not serve
│   ├── BadRequest         400: body is not JSON, or not an object
│   ├── ValidationFailed   422: a field has the wrong type, an unknown feature, a bad row...
│   ├── TooLarge           413: over a configured limit (entities, features, rows, body bytes)
│   ├── UnsupportedMedia   415: a body that is not declared application/json
│   ├── NotFound           404: no such named thing (a service)
│   ├── Unauthorized       401: no API key, or an unknown or malformed one (sends WWW-Authenticate: Bearer)
│   └── Forbidden          403: the key lacks the scope or a feature group; names that, never the key
└── ServiceError (5xx)
    ├── StrictDegraded     503: `strict` was asked and a backend failed
    ├── BackendFailed      503: a write could not reach its backend
    └── Overloaded         503: the worker is at its admission limit, or the request waited past its deadline
                           (sends Retry-After)

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

    def headers(self) -> dict[str, str] | None:
        """Response headers the status needs (WWW-Authenticate on a 401)."""
        return None


class RegistryError(GatewayError):
    title = "Invalid registry"
    type_slug = "invalid-registry"

    def __init__(self, source: str, path: str, reason: str):
        super().__init__(f"{source}: {path}: {reason}", field=path)
        self.source = source
        self.path = path
        self.reason = reason


class KeyConfigError(GatewayError):
    title = "Invalid API key config"
    type_slug = "invalid-key-config"

    def __init__(self, source: str, path: str, reason: str):
        super().__init__(f"{source}: {path}: {reason}", field=path)
        self.source = source
        self.path = path
        self.reason = reason


class ReloadRefused(GatewayError):
    """A reload (POST /v1/admin/reload, SIGHUP) found the registry or the key config invalid: nothing changed."""

    status = 422

    def __init__(self, cause: RegistryError | KeyConfigError, generation: int):
        super().__init__(
            f"{cause.detail}; nothing was reloaded, generation {generation} keeps serving",
            field=cause.path,
            extra={"file": cause.source, "path": cause.path, "reason": cause.reason, "generation": generation},
        )
        self.cause = cause
        self.generation = generation
        self.title = f"Reload refused: {cause.title[0].lower()}{cause.title[1:]}"
        self.type_slug = cause.type_slug


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


class UnsupportedMedia(RequestError):
    status = 415
    title = "Unsupported media type"
    type_slug = "unsupported-media-type"


class NotFound(RequestError):
    status = 404
    title = "Not found"
    type_slug = "not-found"


# RFC 6750 section 3: the challenge a client gets back; the realm is fixed, error codes are the RFC's.
_CHALLENGE = 'Bearer realm="feature-gateway"'


class Unauthorized(RequestError):
    """401. `invalid_token` says a token was sent but is unknown or malformed; without it, none was sent."""

    status = 401
    title = "Not authenticated"
    type_slug = "unauthorized"

    def __init__(self, detail: str, *, invalid_token: bool):
        super().__init__(detail)
        self.invalid_token = invalid_token

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": _CHALLENGE + (', error="invalid_token"' if self.invalid_token else "")}


class Forbidden(RequestError):
    """403. With `scope`, the key lacks that scope (and the challenge says which one the request needs)."""

    status = 403
    title = "Not allowed"
    type_slug = "forbidden"

    def __init__(self, detail: str, *, field: str | None = None, scope: str | None = None):
        super().__init__(detail, field=field)
        self.scope = scope

    def headers(self) -> dict[str, str] | None:
        if self.scope is None:
            return None
        return {"WWW-Authenticate": f'{_CHALLENGE}, error="insufficient_scope", scope="{self.scope}"'}


class ServiceError(GatewayError):
    status = 503


class StrictDegraded(ServiceError):
    title = "Backend unavailable (strict)"
    type_slug = "strict-degraded"


class BackendFailed(ServiceError):
    title = "Backend unavailable"
    type_slug = "backend-unavailable"


class Overloaded(ServiceError):
    """Refused before any backend was asked: nothing was read or written, and trying again shortly is safe."""

    title = "Overloaded"
    type_slug = "overload"
    retry_after_s = 1  # RFC 9110 counts in whole seconds; the limiter adapts within a fraction of one

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


def describe_error(exc: BaseException) -> str:
    """A backend failure in one short line for answers and /readyz (type and message, never a traceback)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
