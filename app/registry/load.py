"""Loading the feature registry: one YAML file, validated once at start-up into `app/registry/model.py`.

Every error names the file, the path of the bad field (`groups.consumer_live.features.orders_7d.default`)
and the reason, so a bad deploy stops with a message a person can act on.

Registries grow to tens of thousands of features, read at every start-up, `check` and reload: a 400 groups x 50
features registry (22,000 lines, bench/big_registry.py) parses in 0.4 s, where PyYAML's pure-Python parser took
2.8 s; libyaml, no cyclic collection during a read, plain strings taken straight from their nodes, and one read
per process for an unchanged file (bench/README.md, "Registry scale", has the figures and how they were taken).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from app.errors import RegistryError
from app.registry.durations import parse_duration
from app.registry.model import (
    REQUEST,
    BackendSpec,
    Cache,
    Entity,
    Feature,
    Group,
    OnDemand,
    Registry,
    Service,
    Stream,
    Streaming,
    TransformFunction,
    expand_ref,
    stored_reads,
)
from app.storage.codec import ENTITY_DTYPES, CodecError, DType, parse_dtype
from app.storage.layout import GroupCodec
from app.streams.aggregates import NUMERIC, Function
from app.streams.tiles import Aggregation
from app.streams.windows import Window

if TYPE_CHECKING:
    from backends.base import BackendKind

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
STREAM_FIELD_KINDS = ("int64", "float64", "bool", "string")
_WINDOW = re.compile(r"^[1-9][0-9]*(s|m|h|d|w)$")  # it ends feature names: no dots, no bare numbers
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


_GROUP_FIELDS = {"entity", "backend", "ttl", "expired_grace", "features", "description", "cache", "local_cache_ms"} | {
    "moving_to",  # written by `feature-gateway move`
    "moving_from",
}

# The longest a group's local_cache_ms may be: how old a value written elsewhere can be served (README)
MAX_LOCAL_CACHE_MS = 60_000.0

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


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """The last registry load_registry read, and what it depended on."""

    path: Path  # resolved
    text: str
    variables: tuple[tuple[str, str | None], ...]  # every ${VAR} the text names, with its value then
    kinds: Mapping[str, BackendKind]
    registry: Registry


_last: _Loaded | None = None


def load_registry(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, kinds: Mapping[str, BackendKind] | None = None
) -> Registry:
    """`env` fills `${VAR}` (the composition root passes os.environ; None: no variables, only defaults);
    `kinds` are the backend types (None: every registered one, `backends.KINDS`).

    The same file read again with the same text, the same values of the variables it names and the same
    kinds is the same registry: the last one is kept and handed back (under the path given this time), since
    `serve` reads the file twice in one process (its check before binding the port, then the app factory),
    which for the 400 x 50 registry of bench/big_registry.py cost 0.8 s of the 2.2 s start-up. Frozen
    dataclasses and read-only mappings make sharing it safe."""
    global _last
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        resolved = Path(path).resolve()
    except OSError as exc:
        raise RegistryError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    env = env or {}
    kinds = _kinds(kinds)
    variables = tuple((name, env.get(name)) for name in sorted({m[1] for m in _ENV.finditer(text)}))
    last = _last
    if last is not None and (last.path, last.text, last.variables, last.kinds) == (resolved, text, variables, kinds):
        return last.registry if last.registry.source == source else dataclasses.replace(last.registry, source=source)
    registry = parse_registry(text, source, env, kinds)
    _last = _Loaded(resolved, text, variables, kinds, registry)
    return registry


def _kinds(kinds: Mapping[str, BackendKind] | None) -> Mapping[str, BackendKind]:
    if kinds is None:
        from backends import KINDS  # here, not at import: the backend modules import the registry's model

        return KINDS
    return kinds


_STR_TAG = "tag:yaml.org,2002:str"


def _duplicate_key_loader(base: type[Any]) -> type[Any]:
    """`base` (yaml.SafeLoader or yaml.CSafeLoader) refusing duplicate keys: YAML would silently keep the last
    feature of a name. The check runs in Python per mapping under either; measured on the 400 x 50 registry
    (bench/big_registry.py) it is lost in the noise (0.55 s with it, 0.56 s without, under libyaml), since
    the keys it builds are the ones construction would build anyway (the constructor caches each node's object)."""

    class Loader(base):  # type: ignore[misc]
        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            # Two scalars in three of a registry are plain strings, whose object is the node's own value: this
            # skips the constructor's bookkeeping for them (0.37 -> 0.30 s for bench/big_registry.py's 400 x 50
            # under libyaml; the same document either way).
            if node.tag == _STR_TAG and type(node) is yaml.ScalarNode:
                return node.value
            return super().construct_object(node, deep)

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


_PureLoader = _duplicate_key_loader(yaml.SafeLoader)
# libyaml's scanner, parser and composer (in C) read the 22,000-line registry of bench/big_registry.py in 0.55 s
# where PyYAML's pure-Python ones take 2.5 s (9 s under a profiler: 20 million calls); construction and the
# resolver stay Python under both and produce the same objects. Without libyaml (a wheel-less platform),
# the pure loader.
_Loader = _duplicate_key_loader(yaml.CSafeLoader) if yaml.__with_libyaml__ else _PureLoader


def _read_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader / CSafeLoader subclass)
    except yaml.constructor.ConstructorError:
        raise  # raised by the Python constructor: the same under either loader
    except yaml.YAMLError as fast:
        if _Loader is _PureLoader:
            raise
        # libyaml finds a syntax error at the same line, but words it more vaguely ("found character that
        # cannot start any token", not which one; "found undefined alias", not its name). Only a broken file
        # pays for a second reading, which stops at the error too, so its message is PyYAML's as before.
        try:
            yaml.load(text, Loader=_PureLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as pure:
            raise pure from None
        raise fast from None  # the two disagree on what is YAML: libyaml's refusal stands, in its words


def parse_registry(
    text: str,
    source: str = "<registry>",
    env: Mapping[str, str] | None = None,
    kinds: Mapping[str, BackendKind] | None = None,
) -> Registry:
    """The registry in `text`; `env` and `kinds` as for load_registry."""
    with _collector_paused():
        try:
            doc = _read_yaml(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1}" if mark else "(file)"
            raise RegistryError(source, where, exc.problem or str(exc)) from None
        except yaml.YAMLError as exc:
            raise RegistryError(source, "(file)", f"not valid YAML: {exc}") from None
        doc = substitute_env(doc, env or {}, "", source)
        return _Builder(source, _kinds(kinds)).build(doc)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a registry is read. Reading one allocates hundreds of thousands of
    objects that all live until it is built (events, nodes, the document, the model), so the collector runs
    again and again, each older-generation pass walking everything allocated so far, and frees nothing: the
    400 x 50 registry parsed in 0.86 s with it and 0.44 s without (libyaml's events alone: 0.50 s and 0.09 s).
    What reading leaves behind is freed by reference counting, as before; the collector resumes after (it is
    left off if someone else had turned it off)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
        self.only(doc, "(root)", {"backends", "entities", "streams", "groups", "on_demand", "services"})
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
        streams = {
            n: self.stream(n, spec, entities)
            for n, spec in self.mapping(doc.get("streams"), "streams", required=False).items()
        }
        groups = {
            n: self.group(n, spec, backends, entities, streams)
            for n, spec in self.mapping(doc.get("groups"), "groups").items()
        }
        on_demand: dict[str, OnDemand] = {}
        context: dict[str, tuple[str, DType]] = {}  # request field -> (the first view declaring it, its dtype)
        for n, spec in self.mapping(doc.get("on_demand"), "on_demand", required=False).items():
            view = on_demand[n] = self.on_demand(n, spec, groups)
            for field, dtype in view.request.items():
                first, declared = context.setdefault(field, (n, dtype))
                if declared != dtype:  # one request may ask for both: one `context` field cannot be both
                    raise self.fail(
                        f"on_demand.{n}.request.{field}",
                        f"{dtype.name} here, but {declared.name} in on_demand.{first}: a context field has one dtype",
                    )
        services = {
            n: self.service(n, spec, groups, on_demand)
            for n, spec in self.mapping(doc.get("services"), "services", required=False).items()
        }
        return Registry(
            self.source,
            MappingProxyType(backends),
            MappingProxyType(entities),
            MappingProxyType(groups),
            MappingProxyType(join_keys),
            MappingProxyType(on_demand),
            MappingProxyType(services),
            MappingProxyType(streams),
        )

    def backend(self, name: str, spec: Any) -> BackendSpec:
        path = f"backends.{name}"
        spec = self.mapping(spec, path)
        kind = self.kinds.get(str(spec.get("type")))
        if kind is None:
            raise self.fail(
                f"{path}.type", f"unknown backend type {spec.get('type')!r}; expected one of {', '.join(self.kinds)}"
            )
        self.only(spec, path, {"type", "cost_per_gb_month", *kind.options})
        cost = spec.get("cost_per_gb_month")
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int | float) or not cost >= 0):
            raise self.fail(f"{path}.cost_per_gb_month", f"expected a price of at least 0, not {cost!r}")
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
        return BackendSpec(name, kind.type, MappingProxyType(options), None if cost is None else float(cost))

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

    def group(
        self,
        name: str,
        spec: Any,
        backends: dict[str, BackendSpec],
        entities: dict[str, Entity],
        streams: Mapping[str, Stream],
    ) -> Group:
        path = f"groups.{name}"
        spec = self.mapping(spec, path)
        if "stream" in spec:
            return self.aggregation_group(name, spec, backends, entities, streams)
        self.only(spec, path, _GROUP_FIELDS)
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
            cache=self.cache(path, spec, backends),
            moving_to=self.move_end(path, spec, backends, "moving_to"),
            moving_from=self.move_end(path, spec, backends, "moving_from"),
            local_cache_ms=self.local_cache_ms(path, spec),
        )

    def local_cache_ms(self, path: str, spec: dict[str, Any]) -> float | None:
        """How long each worker may serve a value from its memory: milliseconds, or a duration (`500ms`, `2s`)."""
        raw = spec.get("local_cache_ms")
        if raw is None:
            return None
        path = f"{path}.local_cache_ms"
        if isinstance(raw, bool):
            raise self.fail(path, "expected milliseconds (such as 1000) or a duration (such as 500ms or 2s)")
        if isinstance(raw, int | float):
            ms = float(raw)
        else:
            try:
                ms = parse_duration(raw) * 1000
            except ValueError:
                raise self.fail(
                    path, f"{raw!r} is not milliseconds (such as 1000) nor a duration (such as 500ms or 2s)"
                ) from None
        if not 0 < ms <= MAX_LOCAL_CACHE_MS:
            raise self.fail(
                path,
                f"{raw!r}: between 0 and {MAX_LOCAL_CACHE_MS:g} ms (values written elsewhere are served this old)",
            )
        return ms

    def cache(self, path: str, spec: dict[str, Any], backends: Mapping[str, BackendSpec]) -> Cache | None:
        """A group's hot tier: a Redis backend other than its own, and how long a copy is kept there."""
        if spec.get("cache") is None:
            return None
        path = f"{path}.cache"
        raw = self.mapping(spec["cache"], path)
        self.only(raw, path, {"backend", "ttl"})
        backend = str(raw.get("backend"))
        if backend not in backends:
            raise self.fail(f"{path}.backend", f"unknown backend {backend!r}; declared: {', '.join(backends)}")
        if backends[backend].type != "redis" or backends[backend].options.get("cluster"):
            raise self.fail(f"{path}.backend", f"a cache is a single-node Redis backend; {backend} is not one")
        if backend == spec["backend"]:
            raise self.fail(f"{path}.backend", "the group already lives on this backend: a cache is another one")
        if raw.get("ttl") is None:
            raise self.fail(f"{path}.ttl", "required: how long a copy is kept in the cache (say 1h)")
        ttl = self.seconds(raw, "ttl", path, zero=False, default=None)
        assert ttl is not None
        return Cache(backend, ttl)

    def move_end(self, path: str, spec: dict[str, Any], backends: Mapping[str, BackendSpec], key: str) -> str | None:
        """`moving_to` / `moving_from`: the other backend of a move (`feature-gateway move` writes them)."""
        other = spec.get(key)
        if other is None:
            return None
        if "moving_to" in spec and "moving_from" in spec:
            raise self.fail(f"{path}.{key}", "a group moves one way at a time: moving_to or moving_from")
        if other not in backends:
            raise self.fail(f"{path}.{key}", f"unknown backend {other!r}; declared: {', '.join(backends)}")
        if other == spec["backend"]:
            raise self.fail(f"{path}.{key}", "the group already lives on this backend")
        if backends[other].options.get("cluster") or backends[spec["backend"]].options.get("cluster"):
            raise self.fail(f"{path}.{key}", "moving a group to or from a Redis Cluster is not supported yet")
        return str(other)

    def feature_dtype(self, path: str, spec: Any) -> DType:
        if isinstance(spec, str):
            spec = {"dtype": spec}
        spec = self.mapping(spec, path)
        self.only(spec, path, {"dtype", "default", "description"})
        try:
            return parse_dtype(str(spec.get("dtype")))
        except CodecError as exc:
            raise self.fail(f"{path}.dtype", str(exc)) from None

    def feature(
        self,
        group: str,
        name: str,
        spec: Any,
        dtype: DType,
        index: int,
        prefix: str = "groups",
        section: str = "features",
    ) -> Feature:
        path = f"{prefix}.{group}.{section}.{name}"
        if isinstance(spec, str):
            spec = {"dtype": spec}
        default = spec.get("default")
        if default is not None:
            try:
                default = dtype.output(dtype.check(default))
            except CodecError as exc:
                raise self.fail(f"{path}.default", f"default does not fit {dtype.name}: {exc}") from None
        return Feature(name, f"{group}:{name}", dtype, default, index)

    # -- request-time features and services -------------------------------------------------------------

    def on_demand(self, name: str, spec: Any, groups: Mapping[str, Group]) -> OnDemand:
        path = f"on_demand.{name}"
        if name in groups or name == REQUEST:
            what = "a group" if name in groups else "the source of context fields"
            raise self.fail(path, f"{name!r} is already {what}; an on-demand feature needs a name of its own")
        spec = self.mapping(spec, path)
        self.only(spec, path, {"function", "inputs", "request", "outputs", "description"})
        function_ref = spec.get("function")
        if not isinstance(function_ref, str) or not _FUNCTION.match(function_ref):
            raise self.fail(f"{path}.function", "expected module:function, e.g. transforms:basket_ratio")
        request = {
            field: self.context_dtype(f"{path}.request.{field}", dtype)
            for field, dtype in self.mapping(spec.get("request"), f"{path}.request", required=False).items()
        }
        inputs = spec.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise self.fail(f"{path}.inputs", "expected a non-empty list of group:feature and request:field")
        for i, ref in enumerate(inputs):
            where = f"{path}.inputs[{i}]"
            source, sep, field = ref.partition(":") if isinstance(ref, str) else ("", "", "")
            if source == REQUEST:
                if field not in request:
                    raise self.fail(where, f"context field {field!r} is not declared in {path}.request")
            elif not sep or field == "*" or source not in groups or field not in groups[source].by_name:
                raise self.fail(where, f"expected group:feature of a declared group or request:field, not {ref!r}")
        if len(set(inputs)) != len(inputs):
            raise self.fail(f"{path}.inputs", "an input is listed twice")
        if all(ref.partition(":")[0] == REQUEST for ref in inputs):
            raise self.fail(
                f"{path}.inputs", "needs a stored feature among its inputs: its rows are that group's entities"
            )
        unused = set(request) - {ref.partition(":")[2] for ref in inputs if ref.startswith(f"{REQUEST}:")}
        if unused:
            raise self.fail(f"{path}.request.{sorted(unused)[0]}", "declared but not among the inputs")
        outputs = []
        for index, (output, ospec) in enumerate(self.mapping(spec.get("outputs"), f"{path}.outputs").items()):
            dtype = self.feature_dtype(f"{path}.outputs.{output}", ospec)
            feature = self.feature(name, output, ospec, dtype, index, prefix="on_demand", section="outputs")
            outputs.append(feature)
        return OnDemand(
            name=name,
            function_ref=function_ref,
            function=self.import_function(f"{path}.function", function_ref),
            inputs=tuple(inputs),
            request=MappingProxyType(request),
            outputs=tuple(outputs),
            by_name=MappingProxyType({f.name: f for f in outputs}),
            description=str(spec.get("description", "")),
        )

    def context_dtype(self, path: str, dtype: Any) -> DType:
        try:
            return parse_dtype(str(dtype))
        except CodecError as exc:
            raise self.fail(path, str(exc)) from None

    def import_function(self, path: str, ref: str) -> TransformFunction:
        """`module:function`, imported from the registry's directory or PYTHONPATH, once, at start-up."""
        module_name, _, attribute = ref.partition(":")
        folder = str(Path(self.source).resolve().parent) if not self.source.startswith("<") else None
        if folder is not None and folder not in sys.path:
            sys.path.append(folder)  # after PYTHONPATH and site-packages: a registry cannot shadow a library
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 (any error of the user's module is a registry error)
            raise self.fail(path, f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
        function = getattr(module, attribute, None)
        if not callable(function):
            raise self.fail(path, f"{module_name} has no function {attribute!r}")
        return function  # type: ignore[no-any-return]

    def service(self, name: str, spec: Any, groups: Mapping[str, Group], on_demand: Mapping[str, OnDemand]) -> Service:
        path = f"services.{name}"
        spec = self.mapping(spec, path)
        self.only(spec, path, {"features", "defaults", "max_age", "deadline_ms", "description"})
        features = spec.get("features")
        if not isinstance(features, list) or not features:
            raise self.fail(f"{path}.features", "expected a non-empty list of feature refs")
        refs: list[str] = []
        for i, ref in enumerate(features):
            if not isinstance(ref, str):
                raise self.fail(f"{path}.features[{i}]", "expected a feature ref such as group:feature")
            try:
                refs += expand_ref(groups, on_demand, ref)
            except ValueError as exc:
                raise self.fail(f"{path}.features[{i}]", str(exc)) from None
        if len(set(refs)) != len(refs):
            twice = next(r for r in refs if refs.count(r) > 1)
            raise self.fail(f"{path}.features", f"{twice} is served twice")
        # Refs a service's defaults and max_age may name: what it serves and what its transforms read.
        stored = stored_reads(on_demand, refs)
        defaults: dict[str, Any] = {}
        raw_defaults = spec.get("defaults") or {}
        if not isinstance(raw_defaults, dict):
            raise self.fail(f"{path}.defaults", "expected a mapping of feature ref -> default")
        for ref, value in raw_defaults.items():
            where = f"{path}.defaults.{ref}"
            if ref not in refs and ref not in stored:
                raise self.fail(where, "not a feature this service serves or computes from")
            source, _, field = str(ref).partition(":")
            feature = (groups[source] if source in groups else on_demand[source]).by_name[field]
            if value is None:
                raise self.fail(where, "a default is a value; omit it to serve the declared one")
            try:
                defaults[ref] = feature.dtype.output(feature.dtype.check(value))
            except CodecError as exc:
                raise self.fail(where, f"default does not fit {feature.dtype.name}: {exc}") from None
        max_age: dict[str, float] = {}
        raw_max_age = spec.get("max_age") or {}
        if not isinstance(raw_max_age, dict):
            raise self.fail(f"{path}.max_age", "expected a mapping of group or group:feature -> duration")
        for key, value in raw_max_age.items():
            where = f"{path}.max_age.{key}"
            source, sep, field = str(key).partition(":")
            group = groups.get(source)
            covered = [r for r in stored if r.partition(":")[0] == source and (not sep or r == key)]
            if group is None or not covered:
                raise self.fail(where, "not a group (or group:feature) this service reads")
            if group.streaming is not None:
                raise self.fail(where, "an aggregation group's windows are as fresh as its stream: no max_age")
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise self.fail(where, str(exc).replace("a ttl", "a max_age")) from None
            if group.ttl_s is not None and seconds > group.ttl_s:
                raise self.fail(
                    where, f"{value} is longer than the group's ttl ({group.ttl_s:g} s): values are expired by then"
                )
            for ref in covered:  # a feature's own max_age wins over its group's, whatever the order written
                if sep or ref not in raw_max_age:
                    max_age[ref] = seconds
        deadline = spec.get("deadline_ms")
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline < math.inf
        ):
            raise self.fail(f"{path}.deadline_ms", "expected a positive number of milliseconds")
        return Service(
            name=name,
            features=tuple(features),
            refs=tuple(refs),
            defaults=MappingProxyType(defaults),
            max_age_s=MappingProxyType(max_age),
            deadline_ms=None if deadline is None else float(deadline),
            description=str(spec.get("description", "")),
        )

    # -- streams and aggregation groups (issue 13) --------------------------------------------------------

    def stream(self, name: str, spec: Any, entities: Mapping[str, Entity]) -> Stream:
        path = f"streams.{name}"
        spec = self.mapping(spec, path)
        self.only(spec, path, {"entity", "event_time", "fields", "source", "description"})
        entity = entities.get(spec.get("entity"))
        if entity is None:
            raise self.fail(f"{path}.entity", f"unknown entity {spec.get('entity')!r}; declared: {', '.join(entities)}")
        event_time = spec.get("event_time")
        if not isinstance(event_time, str) or not _NAME.match(event_time):
            raise self.fail(f"{path}.event_time", "expected the name of the field holding the event time")
        if event_time in (entity.join_key, "event_id"):
            raise self.fail(f"{path}.event_time", f"{event_time} is the event's entity or id, not its time")
        fields: dict[str, DType] = {}
        for field, dtype in self.mapping(spec.get("fields"), f"{path}.fields", required=False).items():
            parsed = self.context_dtype(f"{path}.fields.{field}", dtype)
            if parsed.kind not in STREAM_FIELD_KINDS:
                raise self.fail(f"{path}.fields.{field}", f"a stream field is one of {', '.join(STREAM_FIELD_KINDS)}")
            if field in (event_time, entity.join_key, "event_id", "json"):
                raise self.fail(
                    f"{path}.fields.{field}", "is the event's id, entity or time (or a Redis entry's json), not a field"
                )
            fields[field] = parsed
        source = spec.get("source")
        if source is not None:
            if not isinstance(source, dict):
                raise self.fail(f"{path}.source", "expected a mapping (type: redis_stream or nats, and where)")
            allowed = {
                "redis_stream": {"type", "url", "stream", "group"},
                "nats": {"type", "url", "subject", "durable"},
            }
            keys = allowed.get(source.get("type"))  # type: ignore[arg-type]
            if keys is None:
                raise self.fail(f"{path}.source.type", "expected redis_stream or nats")
            self.only(source, f"{path}.source", keys)
            if not isinstance(source.get("url"), str):
                raise self.fail(f"{path}.source.url", "required: where the stream's server is")
        return Stream(name, entity, event_time, MappingProxyType(fields), source)

    def aggregation_group(
        self,
        name: str,
        spec: dict[str, Any],
        backends: Mapping[str, BackendSpec],
        entities: Mapping[str, Entity],
        streams: Mapping[str, Stream],
    ) -> Group:
        path = f"groups.{name}"
        self.only(
            spec, path, {"entity", "backend", "stream", "allowed_lateness", "max_lag", "aggregations", "description"}
        )
        stream = streams.get(spec.get("stream"))  # type: ignore[arg-type]
        if stream is None:
            raise self.fail(
                f"{path}.stream", f"unknown stream {spec.get('stream')!r}; declared: {', '.join(streams) or 'none'}"
            )
        entity_name = spec.get("entity", stream.entity.name)
        if entity_name != stream.entity.name:
            raise self.fail(
                f"{path}.entity", f"stream {stream.name} is of entity {stream.entity.name}, not {entity_name!r}"
            )
        if spec.get("backend") not in backends:
            raise self.fail(
                f"{path}.backend", f"unknown backend {spec.get('backend')!r}; declared: {', '.join(backends)}"
            )
        if backends[spec["backend"]].options.get("cluster"):
            raise self.fail(
                f"{path}.backend",
                "aggregation groups live on Redis, PostgreSQL/CockroachDB or SQLite; not yet a Redis Cluster",
            )
        lateness = self.seconds(spec, "allowed_lateness", path, zero=True, default=0.0)
        max_lag = self.seconds(spec, "max_lag", path, zero=False, default=None)
        if max_lag is not None and (stream.source or {}).get("type") not in ("redis_stream", "nats"):
            raise self.fail(
                f"{path}.max_lag",
                f"the lag is measured at the stream's source, and stream {stream.name} has none (events over HTTP "
                "are servable when the request answers)",
            )
        if max_lag is not None and max_lag < 2:
            raise self.fail(f"{path}.max_lag", "at least 2s: the lag is measured once a second")
        aggregations: list[Aggregation] = []
        features: list[Feature] = []
        for agg_name, agg_spec in self.mapping(spec.get("aggregations"), f"{path}.aggregations").items():
            aggregation, outputs = self.aggregation(f"{path}.aggregations.{agg_name}", agg_name, agg_spec, stream)
            aggregations.append(aggregation)
            for feature_name, dtype, default in outputs:
                if not _NAME.match(feature_name):
                    raise self.fail(f"{path}.aggregations.{agg_name}", f"{feature_name} is longer than a name may be")
                if any(f.name == feature_name for f in features):
                    raise self.fail(f"{path}.aggregations.{agg_name}", f"feature {feature_name} is made twice")
                features.append(Feature(feature_name, f"{name}:{feature_name}", dtype, default, len(features)))
        return Group(
            name=name,
            entity=stream.entity,
            backend=spec["backend"],
            ttl_s=None,
            grace_s=None,
            features=tuple(features),
            by_name=MappingProxyType({f.name: f for f in features}),
            by_index=MappingProxyType({f.index: f for f in features}),
            codec=GroupCodec([f.dtype for f in features]),
            description=str(spec.get("description", "")),
            streaming=Streaming(stream.name, tuple(aggregations), lateness or 0.0, max_lag),
        )

    def seconds(self, spec: dict[str, Any], key: str, path: str, *, zero: bool, default: float | None) -> float | None:
        if spec.get(key) is None:
            return default
        try:
            return parse_duration(spec[key], zero=zero)
        except ValueError as exc:
            raise self.fail(f"{path}.{key}", str(exc).replace("a ttl", f"{key}")) from None

    def aggregation(
        self, path: str, name: str, spec: Any, stream: Stream
    ) -> tuple[Aggregation, list[tuple[str, DType, Any]]]:
        spec = self.mapping(spec, path)
        self.only(spec, path, {"function", "field", "windows", "default", "description"})
        try:
            function = Function(spec.get("function"))
        except ValueError:
            raise self.fail(f"{path}.function", f"expected one of {', '.join(f.value for f in Function)}") from None
        field = spec.get("field")
        if function is Function.COUNT:
            if field is not None:
                raise self.fail(f"{path}.field", "count counts events: it takes no field")
            dtype = parse_dtype("int64")
        else:
            if field not in stream.fields:
                raise self.fail(
                    f"{path}.field", f"expected a field of stream {stream.name}: {', '.join(stream.fields)}"
                )
            kind = stream.fields[field]
            if function in NUMERIC and kind.kind not in ("int64", "float64"):
                raise self.fail(f"{path}.field", f"{function} needs an int64 or float64 field; {field} is {kind.name}")
            dtype = {
                Function.MEAN: parse_dtype("float64"),
                Function.COUNT_DISTINCT: parse_dtype("int64"),
            }.get(function, kind)
        windows = spec.get("windows")
        if not isinstance(windows, list) or not windows:
            raise self.fail(f"{path}.windows", "expected a list of windows such as [10m, 1h, 1d, 7d]")
        parsed: list[Window] = []
        for i, window in enumerate(windows):
            if not isinstance(window, str) or not _WINDOW.match(window):
                raise self.fail(f"{path}.windows[{i}]", "a window is a whole number and a unit: 90s, 10m, 1h, 1d, 7d")
            try:
                parsed.append(Window.of(window, parse_duration(window)))
            except ValueError as exc:
                raise self.fail(f"{path}.windows[{i}]", str(exc).replace("a ttl", "a window")) from None
        default = spec.get("default")
        if default is not None:
            try:
                default = dtype.output(dtype.check(default))
            except CodecError as exc:
                raise self.fail(f"{path}.default", f"default does not fit {dtype.name}: {exc}") from None
        outputs = [(f"{name}_{w.name}", dtype, default) for w in parsed]
        return Aggregation(name, function, field, tuple(parsed)), outputs
