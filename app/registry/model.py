"""The feature registry as the gateway uses it: frozen dataclasses, built once by `app/registry/load.py`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from app.storage.codec import DType
from app.storage.layout import GroupCodec


@dataclass(frozen=True, slots=True)
class Entity:
    name: str
    join_key: str
    dtype: DType


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    ref: str  # "group:feature"
    dtype: DType
    default: Any  # served form (lists for arrays), None when not declared
    index: int  # position in the group's stored values (app/layout.py: int64s, then float64s, then the rest)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    entity: Entity
    backend: str
    ttl_s: float | None
    # How long a value stays EXPIRED after its ttl before it is reclaimed and reads MISSING (None: no ttl).
    grace_s: float | None
    features: tuple[Feature, ...]
    by_name: Mapping[str, Feature]
    by_index: Mapping[int, Feature]  # by stored position
    codec: GroupCodec = field(repr=False, compare=False)
    description: str = ""

    @property
    def reclaim_after_us(self) -> int | None:
        """ttl + grace: how long after its event time a value reads MISSING and may be deleted (None: never)."""
        if self.ttl_s is None:
            return None
        return int(self.ttl_s * 1_000_000) + int((self.grace_s or 0) * 1_000_000)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    type: str
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Registry:
    source: str
    backends: Mapping[str, BackendSpec]
    entities: Mapping[str, Entity]
    groups: Mapping[str, Group]
    join_keys: Mapping[str, Entity]

    def groups_on(self, backend: str) -> list[Group]:
        return [g for g in self.groups.values() if g.backend == backend]

    def describe(self) -> dict[str, Any]:
        """The registry as served by GET /v1/registry (no credentials: URLs lose their passwords)."""
        return {
            "backends": {
                b.name: {"type": b.type, **{k: _redact(v) for k, v in b.options.items()}}
                for b in self.backends.values()
            },
            "entities": {e.name: {"join_key": e.join_key, "dtype": e.dtype.name} for e in self.entities.values()},
            "groups": {
                g.name: {
                    "entity": g.entity.name,
                    "backend": g.backend,
                    "ttl_seconds": g.ttl_s,
                    "expired_grace_seconds": g.grace_s,
                    "description": g.description,
                    "features": {f.name: {"dtype": f.dtype.name, "default": f.default} for f in g.features},
                }
                for g in self.groups.values()
            },
        }


_SECRET_PARAMS = {"password", "sslpassword"}  # both drivers also take a password from the query string


def _redact(value: Any) -> Any:
    if not isinstance(value, str) or "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password:
        value = value.replace(f":{parts.password}@", ":***@", 1)
        parts = urlsplit(value)
    if parts.query:
        query = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, True)]
        value = urlunsplit(parts._replace(query=urlencode(query, safe="*")))
    return value
