"""Storage backends behind one protocol (`backends.base.FeatureBackend`)."""

from __future__ import annotations

from app.registry import BackendSpec, Registry
from backends.base import FeatureBackend


def open_backend(spec: BackendSpec, registry: Registry) -> FeatureBackend:
    """Build the client for one backend; connects lazily, so a backend that is down does not stop start-up."""
    groups = registry.groups_on(spec.name)
    if spec.type == "redis" and spec.options.get("cluster"):
        from backends.redis_cluster import RedisClusterBackend

        return RedisClusterBackend(spec, groups)
    if spec.type == "redis":
        from backends.redis import RedisBackend

        return RedisBackend(spec, groups)
    if spec.type == "cockroach":
        from backends.cockroach import CockroachBackend

        return CockroachBackend(spec, groups)
    if spec.type == "sqlite":
        from backends.sqlite import SqliteBackend

        return SqliteBackend(spec, groups)
    raise ValueError(f"unknown backend type {spec.type!r}")
