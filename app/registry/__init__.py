"""The feature registry: what can be fetched, where it lives, its dtypes, defaults and ttl.

`model.py` holds the frozen dataclasses the gateway serves from; `load.py` turns a YAML file into them,
with errors that name the file, the field's path and the reason.
"""

from app.registry.durations import parse_duration
from app.registry.load import load_registry, parse_registry
from app.registry.model import BackendSpec, Entity, Feature, Group, Registry

__all__ = ["BackendSpec", "Entity", "Feature", "Group", "Registry", "load_registry", "parse_duration", "parse_registry"]
