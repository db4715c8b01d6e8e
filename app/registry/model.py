"""The feature registry as the gateway uses it: frozen dataclasses, built once by `app/registry/load.py`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from app.storage.codec import DType
from app.storage.layout import GroupCodec
from app.streams.tiles import Aggregation


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
class Cache:
    """A read-through hot tier in front of a group's backend (its system of record): `backend` holds copies of
    the values read or written lately, each kept `ttl_s` at most (issue 14, app/tiering/)."""

    backend: str
    ttl_s: float


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
    streaming: Streaming | None = None  # an aggregation group: its features are windows over a stream
    cache: Cache | None = None  # a hot tier read first, the backend read for what it lacks
    # While `feature-gateway move` runs (app/tiering/move.py): writes go to `backend` and also to the backend
    # the group is moving to (reads stay on `backend`), then, once reads are cut over to the new `backend`,
    # also to the one it is moving from, until every worker reads the new one.
    moving_to: str | None = None
    moving_from: str | None = None
    # Served from each worker's memory for at most this long after the read that got it (app/serving/local_cache.py)
    local_cache_ms: float | None = None

    @property
    def also_written(self) -> str | None:
        """The backend written after `backend` during a move, if any."""
        return self.moving_to or self.moving_from

    @property
    def backends(self) -> tuple[str, ...]:
        """Every backend holding this group's values: its own, its cache's, the other one of a move."""
        names = [self.backend]
        if self.cache is not None:
            names.append(self.cache.backend)
        if self.also_written is not None:
            names.append(self.also_written)
        return tuple(dict.fromkeys(names))

    @property
    def reclaim_after_us(self) -> int | None:
        """ttl + grace: how long after its event time a value reads MISSING and may be deleted (None: never)."""
        if self.ttl_s is None:
            return None
        return int(self.ttl_s * 1_000_000) + int((self.grace_s or 0) * 1_000_000)


@dataclass(frozen=True, slots=True)
class Stream:
    """Events of one entity: an event time and typed fields (issue 13); `source` is where a consumer reads them
    (Redis Streams, NATS JetStream), None for events posted over HTTP only."""

    name: str
    entity: Entity
    event_time: str
    fields: Mapping[str, DType]
    source: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Streaming:
    """What makes a group an aggregation group: its stream, its aggregations (each feature is one aggregation
    over one window), how late an event may arrive, and how long tiles and event ids are kept."""

    stream: str
    aggregations: tuple[Aggregation, ...]
    allowed_lateness_s: float
    max_lag_s: float | None

    @property
    def keep_us(self) -> int:
        """The longest window plus the lateness: how long seen event ids must be kept."""
        longest = max(w.seconds for a in self.aggregations for w in a.windows)
        return (longest + int(self.allowed_lateness_s)) * 1_000_000

    @property
    def tile_keep_us(self) -> dict[int, int]:
        """Per tile size, how long after its end a tile must be kept: the longest window of that tile size plus
        the lateness (a 10 s tile of a 10m window is not kept for the 7d window's sake)."""
        keep: dict[int, int] = {}
        for window in (w for a in self.aggregations for w in a.windows):
            keep[window.tile_s] = max(keep.get(window.tile_s, 0), window.seconds)
        return {size: (seconds + int(self.allowed_lateness_s)) * 1_000_000 for size, seconds in keep.items()}

    @property
    def by_name(self) -> Mapping[str, Aggregation]:
        return {a.name: a for a in self.aggregations}


# The source name of request-time inputs of an on-demand feature: `request:basket_value` is a `context` field.
REQUEST = "request"

# An on-demand function: input name (as written in `inputs`) -> one value per row; output name -> one per row.
TransformFunction = Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class OnDemand:
    """Features computed at request time by a function of stored features and `context` fields (Feast's
    on-demand feature views). Its outputs are features `name:output`; `index` is the output's position."""

    name: str
    function_ref: str  # "module:function", as written
    function: TransformFunction = field(repr=False, compare=False)
    inputs: tuple[str, ...]  # "group:feature" or "request:field", as written (the function's input names)
    request: Mapping[str, DType]  # the context fields it reads
    outputs: tuple[Feature, ...]
    by_name: Mapping[str, Feature]
    description: str = ""

    @property
    def input_groups(self) -> list[str]:
        """The groups whose features it reads, in the order of its inputs."""
        sources = [ref.partition(":")[0] for ref in self.inputs]
        return list(dict.fromkeys(s for s in sources if s != REQUEST))


@dataclass(frozen=True, slots=True)
class Service:
    """What one model is served (a feature service): its features in its order, the defaults it was trained
    with, how old a value it accepts, and its deadline."""

    name: str
    features: tuple[str, ...]  # as declared (group:feature, group:*, on-demand name or name:output)
    refs: tuple[str, ...]  # resolved: one canonical ref per served value
    defaults: Mapping[str, Any]  # canonical ref -> served default for this model (overrides the declared one)
    max_age_s: Mapping[str, float]  # canonical ref -> stricter than the group's ttl, for this model only
    deadline_ms: float | None
    description: str = ""


def stored_reads(on_demand: Mapping[str, OnDemand], refs: Sequence[str]) -> set[str]:
    """The stored features (canonical refs) that serving `refs` reads: the stored ones and on-demand inputs."""
    reads = set()
    for ref in refs:
        view = on_demand.get(ref.partition(":")[0])
        if view is None:
            reads.add(ref)
        else:
            reads.update(i for i in view.inputs if i.partition(":")[0] != REQUEST)
    return reads


def expand_ref(groups: Mapping[str, Group], on_demand: Mapping[str, OnDemand], ref: str) -> list[str]:
    """The canonical refs (`group:feature`, `on_demand:output`) a requested ref stands for: `group:*` and a
    bare on-demand name stand for all their features. ValueError with the reason when it names nothing."""
    source, sep, name = ref.partition(":")
    group = groups.get(source)
    if group is not None and sep:
        if name == "*":
            return [f.ref for f in group.features]
        if name in group.by_name:
            return [group.by_name[name].ref]
        raise ValueError(f"unknown feature {name!r} in group {source}; it has {', '.join(group.by_name)}")
    view = on_demand.get(source)
    if view is not None:
        if not sep or name == "*":
            return [f.ref for f in view.outputs]
        if name in view.by_name:
            return [view.by_name[name].ref]
        raise ValueError(f"unknown output {name!r} of on-demand {source}; it has {', '.join(view.by_name)}")
    known = ", ".join([*groups, *on_demand])
    if not sep:
        raise ValueError(f"expected group:feature, group:* or an on-demand feature name; known: {known}")
    raise ValueError(f"unknown group {source!r}; known: {known}")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    type: str
    options: Mapping[str, Any]
    cost_per_gb_month: float | None = None  # the price of a GiB held a month, for the cost report (any type)


@dataclass(frozen=True, slots=True)
class Registry:
    source: str
    backends: Mapping[str, BackendSpec]
    entities: Mapping[str, Entity]
    groups: Mapping[str, Group]
    join_keys: Mapping[str, Entity]
    on_demand: Mapping[str, OnDemand] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    streams: Mapping[str, Stream] = field(default_factory=dict)

    def expand(self, ref: str) -> list[str]:
        return expand_ref(self.groups, self.on_demand, ref)

    def feature(self, ref: str) -> Feature:
        """The feature (stored or on-demand output) of a canonical ref."""
        source, _, name = ref.partition(":")
        owner = self.groups.get(source) or self.on_demand[source]
        return owner.by_name[name]

    def service_reads(self, service: Service) -> set[str]:
        """The stored features (canonical refs) a service serves or computes from."""
        return stored_reads(self.on_demand, service.refs)

    def service_groups(self, service: Service) -> set[str]:
        return {ref.partition(":")[0] for ref in self.service_reads(service)}

    def describe_service(self, service: Service) -> dict[str, Any]:
        """A service as GET /v1/services answers it: the resolved features with the defaults it serves."""
        features = []
        for ref in service.refs:
            feature = self.feature(ref)
            default = service.defaults.get(ref, feature.default)
            entry: dict[str, Any] = {"name": ref, "dtype": feature.dtype.name, "default": default}
            if ref in service.max_age_s:
                entry["max_age_seconds"] = service.max_age_s[ref]
            features.append(entry)
        return {
            "name": service.name,
            "description": service.description,
            "features": features,
            "deadline_ms": service.deadline_ms,
        }

    def groups_on(self, backend: str) -> list[Group]:
        """The groups whose values `backend` holds: as their own backend, their cache or the target of a move."""
        return [g for g in self.groups.values() if backend in g.backends]

    def describe(self) -> dict[str, Any]:
        """The registry as served by GET /v1/registry (no credentials: URLs lose their passwords)."""
        return {
            "backends": {
                b.name: {"type": b.type, **{k: _redact(v) for k, v in b.options.items()}}
                | ({} if b.cost_per_gb_month is None else {"cost_per_gb_month": b.cost_per_gb_month})
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
                | ({} if g.cache is None else {"cache": {"backend": g.cache.backend, "ttl_seconds": g.cache.ttl_s}})
                | ({} if g.moving_to is None else {"moving_to": g.moving_to})
                | ({} if g.moving_from is None else {"moving_from": g.moving_from})
                | (
                    {}
                    if g.streaming is None
                    else {
                        "stream": g.streaming.stream,
                        "allowed_lateness_seconds": g.streaming.allowed_lateness_s,
                        "max_lag_seconds": g.streaming.max_lag_s,
                        "aggregations": {
                            a.name: {
                                "function": a.function.value,
                                "field": a.field,
                                "windows": [w.name for w in a.windows],
                            }
                            for a in g.streaming.aggregations
                        },
                    }
                )
                for g in self.groups.values()
            },
            "streams": {
                st.name: {
                    "entity": st.entity.name,
                    "event_time": st.event_time,
                    "fields": {k: d.name for k, d in st.fields.items()},
                    "source": None if st.source is None else {k: _redact(v) for k, v in st.source.items()},
                }
                for st in self.streams.values()
            },
            "on_demand": {
                v.name: {
                    "function": v.function_ref,
                    "inputs": list(v.inputs),
                    "request": {k: d.name for k, d in v.request.items()},
                    "outputs": {f.name: {"dtype": f.dtype.name, "default": f.default} for f in v.outputs},
                    "description": v.description,
                }
                for v in self.on_demand.values()
            },
            "services": {s.name: self.describe_service(s) for s in self.services.values()},
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
