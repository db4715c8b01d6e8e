"""Storage backends behind one protocol (`backends.base.FeatureBackend`), one module each.

To add one, write its module (the class, its `KIND`) and add it to the tuple below: backends/README.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.registry.model import BackendSpec, Registry
from backends import cockroach, redis, sqlite
from backends.base import BackendKind, FeatureBackend

KINDS: Mapping[str, BackendKind] = {kind.type: kind for kind in (redis.KIND, cockroach.KIND, sqlite.KIND)}


def open_backend(spec: BackendSpec, registry: Registry) -> FeatureBackend:
    """Build the client for one backend; connects lazily, so a backend that is down does not stop start-up."""
    return KINDS[spec.type].open(spec, registry.groups_on(spec.name))
