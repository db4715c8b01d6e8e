"""Loading the feature registry: one YAML file, validated once at start-up into `app/registry/model.py`.

Every error names the file, the path of the bad field (`groups.consumer_live.features.orders_7d.default`)
and the reason, so a bad deploy stops with a message a person can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from app.errors import RegistryError
from app.registry.durations import parse_duration
from app.registry.model import BackendSpec, Entity, Feature, Group, Registry
from app.storage.codec import ENTITY_DTYPES, CodecError, DType, parse_dtype
from app.storage.layout import GroupCodec

if TYPE_CHECKING:
    from backends.base import BackendKind

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# An expired value is kept (and served EXPIRED) this long by default: the group's ttl, at most one day.
MAX_DEFAULT_GRACE_S = 86_400.0


# -- loading -------------------------------------------------------------------------------------------


def substitute_env(value: Any, env: Mapping[str, str], path: str, source: str) -> Any:
    """Fill `${VAR}` and `${VAR:-default}` in every string of the document."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, f"{path}.{k}" if path else str(k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def fill(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise RegistryError(source, path, f"environment variable {name} is not set and has no default")

        return _ENV.sub(fill, value)
    return value


def load_registry(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, kinds: Mapping[str, BackendKind] | None = None
) -> Registry:
    """`env` fills `${VAR}` (the composition root passes os.environ; None: no variables, only defaults);
    `kinds` are the backend types (None: every registered one, `backends.KINDS`)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    return parse_registry(text, source, env, kinds)


def _duplicate_key_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader that refuses duplicate keys: YAML would silently keep the last feature of a name."""

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


_Loader = _duplicate_key_loader()


def parse_registry(
    text: str,
    source: str = "<registry>",
    env: Mapping[str, str] | None = None,
    kinds: Mapping[str, BackendKind] | None = None,
) -> Registry:
    """The registry in `text`; `env` and `kinds` as for load_registry."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise RegistryError(source, where, exc.problem or str(exc)) from None
    except yaml.YAMLError as exc:
        raise RegistryError(source, "(file)", f"not valid YAML: {exc}") from None
    doc = substitute_env(doc, env or {}, "", source)
    if kinds is None:
        from backends import KINDS  # here, not at import: the backend modules import the registry's model

        kinds = KINDS
    return _Builder(source, kinds).build(doc)


class _Builder:
    def __init__(self, source: str, kinds: Mapping[str, BackendKind]):
        self.source = source
        self.kinds = kinds

    def fail(self, path: str, reason: str) -> RegistryError:
        return RegistryError(self.source, path, reason)

    def mapping(self, value: Any, path: str, *, required: bool = True) -> dict[str, Any]:
        if value is None and not required:
            return {}
        if not isinstance(value, dict) or (required and not value):
            raise self.fail(path, "expected a non-empty mapping")
        for key in value:
            if not isinstance(key, str) or not _NAME.match(key):
                raise self.fail(f"{path}.{key}", "names are letters, digits and underscores, not starting with a digit")
        return value

    def only(self, value: dict[str, Any], path: str, allowed: set[str]) -> None:
        for key in value:
            if key not in allowed:
                raise self.fail(f"{path}.{key}", f"unknown field; expected one of {', '.join(sorted(allowed))}")

    def build(self, doc: Any) -> Registry:
        if not isinstance(doc, dict):
            raise self.fail("(root)", "expected a mapping with backends, entities and groups")
        self.only(doc, "(root)", {"backends", "entities", "groups"})
        backends = {n: self.backend(n, spec) for n, spec in self.mapping(doc.get("backends"), "backends").items()}
        entities = {n: self.entity(n, spec) for n, spec in self.mapping(doc.get("entities"), "entities").items()}
        join_keys: dict[str, Entity] = {}
        for entity in entities.values():
            if entity.join_key in join_keys:
                raise self.fail(
                    f"entities.{entity.name}.join_key",
                    f"join key {entity.join_key!r} is already used by {join_keys[entity.join_key].name}",
                )
            join_keys[entity.join_key] = entity
        groups = {
            n: self.group(n, spec, backends, entities) for n, spec in self.mapping(doc.get("groups"), "groups").items()
        }
        return Registry(
            self.source,
            MappingProxyType(backends),
            MappingProxyType(entities),
            MappingProxyType(groups),
            MappingProxyType(join_keys),
        )

    def backend(self, name: str, spec: Any) -> BackendSpec:
        path = f"backends.{name}"
        spec = self.mapping(spec, path)
        kind = self.kinds.get(str(spec.get("type")))
        if kind is None:
            raise self.fail(
                f"{path}.type", f"unknown backend type {spec.get('type')!r}; expected one of {', '.join(self.kinds)}"
            )
        self.only(spec, path, {"type", *kind.options})
        options: dict[str, Any] = {}
        for option, declared in kind.options.items():
            if option not in spec:
                if declared.default is ...:  # backends.base.REQUIRED
                    raise self.fail(f"{path}.{option}", "required")
                options[option] = declared.default
                continue
            try:
                options[option] = declared.check(spec[option])
            except ValueError as exc:
                raise self.fail(f"{path}.{option}", str(exc)) from None
        problem = kind.rules(options) if kind.rules else None
        if problem:
            raise self.fail(f"{path}.{problem[0]}", problem[1])
        return BackendSpec(name, kind.type, MappingProxyType(options))

    def entity(self, name: str, spec: Any) -> Entity:
        path = f"entities.{name}"
        spec = self.mapping(spec, path)
        self.only(spec, path, {"join_key", "dtype"})
        join_key = spec.get("join_key", name)
        if not isinstance(join_key, str) or not _NAME.match(join_key):
            raise self.fail(f"{path}.join_key", "expected a name (letters, digits, underscores)")
        dtype = spec.get("dtype", "int64")
        if dtype not in ENTITY_DTYPES:
            raise self.fail(f"{path}.dtype", f"an entity key is one of {', '.join(ENTITY_DTYPES)}, not {dtype!r}")
        return Entity(name, join_key, parse_dtype(dtype))

    def group(self, name: str, spec: Any, backends: dict[str, BackendSpec], entities: dict[str, Entity]) -> Group:
        path = f"groups.{name}"
        spec = self.mapping(spec, path)
        self.only(spec, path, {"entity", "backend", "ttl", "expired_grace", "features", "description"})
        if spec.get("entity") not in entities:
            raise self.fail(f"{path}.entity", f"unknown entity {spec.get('entity')!r}; declared: {', '.join(entities)}")
        if spec.get("backend") not in backends:
            raise self.fail(
                f"{path}.backend", f"unknown backend {spec.get('backend')!r}; declared: {', '.join(backends)}"
            )
        ttl: float | None = None
        if spec.get("ttl") is not None:
            try:
                ttl = parse_duration(spec["ttl"])
            except ValueError as exc:
                raise self.fail(f"{path}.ttl", str(exc)) from None
        grace: float | None = None if ttl is None else min(ttl, MAX_DEFAULT_GRACE_S)
        if spec.get("expired_grace") is not None:
            if ttl is None:
                raise self.fail(f"{path}.expired_grace", "needs a ttl: a group without one never expires")
            try:
                grace = parse_duration(spec["expired_grace"], zero=True)
            except ValueError as exc:
                raise self.fail(f"{path}.expired_grace", str(exc)) from None
        raw_features = self.mapping(spec.get("features"), f"{path}.features")
        dtypes = [self.feature_dtype(f"{path}.features.{f}", fspec) for f, fspec in raw_features.items()]
        codec = GroupCodec(dtypes)
        features = tuple(
            self.feature(name, f, fspec, dtype, codec.stored_index[i])
            for i, ((f, fspec), dtype) in enumerate(zip(raw_features.items(), dtypes, strict=True))
        )
        return Group(
            name=name,
            entity=entities[spec["entity"]],
            backend=spec["backend"],
            ttl_s=ttl,
            grace_s=grace,
            features=features,
            by_name=MappingProxyType({f.name: f for f in features}),
            by_index=MappingProxyType({f.index: f for f in features}),
            description=str(spec.get("description", "")),
            codec=codec,
        )

    def feature_dtype(self, path: str, spec: Any) -> DType:
        if isinstance(spec, str):
            spec = {"dtype": spec}
        spec = self.mapping(spec, path)
        self.only(spec, path, {"dtype", "default", "description"})
        try:
            return parse_dtype(str(spec.get("dtype")))
        except CodecError as exc:
            raise self.fail(f"{path}.dtype", str(exc)) from None

    def feature(self, group: str, name: str, spec: Any, dtype: DType, index: int) -> Feature:
        path = f"groups.{group}.features.{name}"
        if isinstance(spec, str):
            spec = {"dtype": spec}
        default = spec.get("default")
        if default is not None:
            try:
                default = dtype.output(dtype.check(default))
            except CodecError as exc:
                raise self.fail(f"{path}.default", f"default does not fit {dtype.name}: {exc}") from None
        return Feature(name, f"{group}:{name}", dtype, default, index)
