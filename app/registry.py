"""The feature registry: one YAML file, validated once at start-up into frozen dataclasses.

Every error names the file, the path of the bad field (`groups.consumer_live.features.orders_7d.default`)
and the reason, so a bad deploy stops with a message a person can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import yaml

from app.codec import ENTITY_DTYPES, CodecError, DType, parse_dtype
from app.errors import RegistryError
from app.layout import GroupCodec

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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


def parse_duration(value: Any, *, zero: bool = False) -> float:
    """`90s`, `15m`, `1h`, `30d`, `2w`, `500ms`, or a number of seconds; positive (or 0 with `zero`)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m, 1h, 30d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 90s, 15m, 1h, 30d")
        seconds = float(match[1]) * _UNITS[match[2]]
    if zero and not 0 <= seconds < float("inf"):
        raise ValueError("expected a duration of 0 or more")
    if not zero and not 0 < seconds < float("inf"):
        raise ValueError("a ttl must be positive (omit it for values that never expire)")
    return seconds


# An expired value is kept (and served EXPIRED) this long by default: the group's ttl, at most one day.
MAX_DEFAULT_GRACE_S = 86_400.0


# -- backend options -----------------------------------------------------------------------------------


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@,]+)(?::(\d{1,5}))?$")


def url_hosts(url: str) -> list[tuple[str, int | None]]:
    """The (host, port) pairs of a URL; several where it lists them: `postgresql://u@h1:26257,h2:26257/db`.

    Raises ValueError naming the first that is not `host` or `host:port` (IPv6 in brackets).
    """
    hosts: list[tuple[str, int | None]] = []
    for item in urlsplit(url).netloc.rpartition("@")[2].split(","):
        match = _HOST.match(item)
        port = None if match is None or match[2] is None else int(match[2])
        if match is None or port == 0 or (port is not None and port > 65535):
            raise ValueError(f"{url!r}: {item!r} is not a host or host:port")
        hosts.append((unquote(match[1].strip("[]")), port))
    return hosts


def _url(schemes: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a URL string")
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ValueError(f"{value!r}: scheme must be one of {', '.join(schemes)}")
        if parts.scheme != "unix":
            if not parts.netloc:
                raise ValueError(f"{value!r} has no host")
            url_hosts(value)
        return value

    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _positive(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError("expected a positive number")
        return kind(value)

    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return check


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError("expected an SQL identifier (letters, digits, underscore)")
    return value


def _file_path(value: Any) -> str:
    if not isinstance(value, str) or not value or value == ":memory:" or value.startswith("file:"):
        raise ValueError("expected a file path (the reader and writer threads share it, so not :memory:)")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _redis_rules(options: Mapping[str, Any]) -> tuple[str, str] | None:
    """What a redis backend's options must agree on; (option, reason) for the first that does not."""
    url = urlsplit(options["url"])
    several = url.scheme != "unix" and len(url_hosts(options["url"])) > 1
    if not options["cluster"]:
        if several:
            return "url", "lists several hosts, which is a Redis Cluster's seed list: add cluster: true"
        return None
    if url.scheme == "unix":
        return "url", "a Redis Cluster is reached over TCP (redis:// or rediss://), not a unix socket"
    db = parse_qs(url.query).get("db", [url.path.strip("/")])[0]
    if db not in ("", "0"):
        return "url", f"a Redis Cluster has only database 0, not {db}"
    if "{" in options["key_prefix"] or "}" in options["key_prefix"]:
        return "key_prefix", "must not contain { or }: on a cluster the key's first {...} is the gateway's hash tag"
    return None


# type -> option -> (validator, default); a default of ... marks a required option.
BACKEND_OPTIONS: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "redis": {
        "url": (_url(("redis", "rediss", "unix")), ...),
        "cluster": (_flag, False),
        "key_prefix": (_text, "fg:"),
        "timeout_ms": (_positive(float), 1000.0),
        "connect_timeout_ms": (_positive(float), 1000.0),
        "pool_size": (_positive(int), 64),
    },
    "cockroach": {
        "dsn": (_url(("postgresql", "postgres")), ...),
        "dialect": (_choice("auto", "cockroach", "postgres"), "auto"),
        "schema": (_identifier, "public"),
        "table": (_identifier, "feature_values"),
        "timeout_ms": (_positive(float), 2000.0),
        "connect_timeout_ms": (_positive(float), 1000.0),
        "pool_size": (_positive(int), 16),
        "cleanup_interval": (parse_duration, 600.0),
    },
    "sqlite": {
        "path": (_file_path, ...),
        "timeout_ms": (_positive(float), 1000.0),
        "cleanup_interval": (parse_duration, 600.0),
    },
}

# type -> a check of the options together, after each passed its own validator.
BACKEND_RULES: dict[str, Callable[[Mapping[str, Any]], tuple[str, str] | None]] = {"redis": _redis_rules}


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


def load_registry(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Registry:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    return parse_registry(text, source, env)


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


def parse_registry(text: str, source: str = "<registry>", env: Mapping[str, str] | None = None) -> Registry:
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise RegistryError(source, where, exc.problem or str(exc)) from None
    except yaml.YAMLError as exc:
        raise RegistryError(source, "(file)", f"not valid YAML: {exc}") from None
    doc = substitute_env(doc, os.environ if env is None else env, "", source)
    return _Builder(source).build(doc)


class _Builder:
    def __init__(self, source: str):
        self.source = source

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
        kind = spec.get("type")
        if kind not in BACKEND_OPTIONS:
            raise self.fail(
                f"{path}.type", f"unknown backend type {kind!r}; expected one of {', '.join(BACKEND_OPTIONS)}"
            )
        table = BACKEND_OPTIONS[kind]
        self.only(spec, path, {"type", *table})
        options: dict[str, Any] = {}
        for option, (check, default) in table.items():
            if option not in spec:
                if default is ...:
                    raise self.fail(f"{path}.{option}", "required")
                options[option] = default
                continue
            try:
                options[option] = check(spec[option])
            except ValueError as exc:
                raise self.fail(f"{path}.{option}", str(exc)) from None
        rules = BACKEND_RULES.get(kind)
        problem = rules(options) if rules else None
        if problem:
            raise self.fail(f"{path}.{problem[0]}", problem[1])
        return BackendSpec(name, kind, MappingProxyType(options))

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
