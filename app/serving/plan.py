"""Planning a fetch, once per distinct feature list: which groups, on which backends, which stored positions,
in what order to serve them; and turning one stored blob into one answer (a cell) with statuses and defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from types import MappingProxyType
from typing import Any

from app.errors import TooLarge, ValidationFailed
from app.registry.model import REQUEST, Group, OnDemand, Registry, Service
from app.serving.statuses import EXPIRED, MISSING, PRESENT, UNAVAILABLE, Cell
from app.serving.usage import UsageCounts
from app.storage.codec import CodecError, DType


def _getter(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """itemgetter that always returns a tuple (a bare itemgetter returns a scalar for one position)."""
    if len(positions) == 1:
        only = positions[0]
        return lambda values: (values[only],)
    return itemgetter(*positions)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    group: Group
    positions: tuple[int, ...]  # indexes into the group's stored values, in the order they are served
    pick: Callable[[Sequence[Any]], tuple[Any, ...]]
    decode: Callable[[bytes], tuple[int, list[Any]]]
    defaults: tuple[Any, ...]
    present: tuple[str, ...]
    missing: Cell
    expired: Cell
    unavailable: Cell
    ttl_us: int | None
    # A service's max_age per served position (None: the group's ttl alone), and the strictest of them:
    # a value older than a position's max_age is EXPIRED for that model only.
    max_age_us: tuple[int | None, ...] | None
    strictest_us: int
    reclaim_us: (
        int  # ttl + grace (unused without a ttl): older values read MISSING, whether or not a backend has deleted them
    )
    # Feature usage of requests using this plan, counted in cells (one per row) for each of its features.
    # Counted here (bounded: plans are cached per feature list) and folded into per-feature totals on eviction.
    usage: UsageCounts
    served: int  # how many of `positions` are served (the rest are read only for on-demand functions)

    @property
    def counted(self) -> tuple[int, ...]:
        """The positions whose usage this plan counts: those it serves."""
        return self.positions[: self.served]

    @classmethod
    def build(
        cls,
        group: Group,
        positions: Sequence[int],
        defaults_of: Mapping[str, Any] | None = None,
        max_age_s: Mapping[str, float] | None = None,
        served: int | None = None,
    ) -> GroupPlan:
        """`defaults_of` and `max_age_s`, by canonical ref: a service's, overriding the group's."""
        features = [group.by_index[p] for p in positions]
        defaults = tuple((defaults_of or {}).get(f.ref, f.default) for f in features)
        ages = [None if max_age_s is None or f.ref not in max_age_s else int(max_age_s[f.ref] * 1e6) for f in features]
        limited = [a for a in ages if a is not None]
        width = len(positions)
        return cls(
            group=group,
            positions=tuple(positions),
            pick=_getter(positions),
            decode=group.codec.decode,
            defaults=defaults,
            present=(PRESENT,) * width,
            missing=Cell(defaults, (MISSING,) * width, None),
            expired=Cell(defaults, (EXPIRED,) * width, None),
            unavailable=Cell(defaults, (UNAVAILABLE,) * width, None),
            ttl_us=None if group.ttl_s is None else int(group.ttl_s * 1_000_000),
            max_age_us=tuple(ages) if limited else None,
            strictest_us=min(limited) if limited else 0,
            reclaim_us=group.reclaim_after_us or 0,
            usage=UsageCounts(),
            served=width if served is None else served,
        )

    def cell(self, blob: bytes | None, now_us: int, nulls: dict[tuple[str, int], int]) -> Cell:
        if blob is None:
            return self.missing
        try:
            event_us, values = self.decode(blob)
        except CodecError:
            return self.missing  # unreadable (foreign writer, future layout, corruption): as good as absent
        if self.ttl_us is not None and now_us - event_us > self.ttl_us:
            # One expiry rule on every backend (README, "Expiry"): the row's age alone decides, not whether
            # Redis' key ttl or a SQL cleanup has removed it yet.
            return self.missing if now_us - event_us > self.reclaim_us else self.expired
        picked = self.pick(values)
        if self.max_age_us is not None and now_us - event_us > self.strictest_us:
            return self._aged(picked, now_us - event_us, event_us, nulls)
        if None in picked:  # stored as null: that value was never given
            served, statuses = list(picked), list(self.present)
            for i, value in enumerate(picked):
                if value is None:
                    served[i], statuses[i] = self.defaults[i], MISSING
                    nulls[(self.group.name, self.positions[i])] += 1
            return Cell(tuple(served), tuple(statuses), event_us)
        return Cell(picked, self.present, event_us)

    def _aged(self, picked: tuple[Any, ...], age_us: int, event_us: int, nulls: dict[tuple[str, int], int]) -> Cell:
        """A value older than some position's max_age (a service's): those positions are EXPIRED with their
        defaults, the others served as usual."""
        assert self.max_age_us is not None
        served, statuses = list(picked), list(self.present)
        for i, limit in enumerate(self.max_age_us):
            if limit is not None and age_us > limit:
                served[i], statuses[i] = self.defaults[i], EXPIRED
            elif picked[i] is None:
                served[i], statuses[i] = self.defaults[i], MISSING
                nulls[(self.group.name, self.positions[i])] += 1
        if all(s is EXPIRED for s in statuses):
            return self.expired
        return Cell(tuple(served), tuple(statuses), event_us)


# How bad a status is, for an on-demand output computed from several inputs: it carries its worst input's.
SEVERITY = {PRESENT: 0, EXPIRED: 1, MISSING: 2, UNAVAILABLE: 3}


@dataclass(frozen=True, slots=True)
class TransformPlan:
    """One on-demand feature view in a plan: where its inputs are, what its outputs default to."""

    view: OnDemand
    stored: tuple[tuple[str, int, int], ...]  # (input name, index into Plan.groups, offset in that group's values)
    request: tuple[tuple[str, str], ...]  # (input name, context field)
    defaults: tuple[Any, ...]  # per output (a service's override, else the declared default)
    unavailable: Cell
    statuses: Mapping[str, tuple[str, ...]]  # status -> that status for every output
    served: tuple[int, ...]  # the outputs the plan serves (all are computed)

    @property
    def width(self) -> int:
        return len(self.defaults)


@dataclass(frozen=True, slots=True)
class Plan:
    features: tuple[str, ...]  # expanded refs, request order
    groups: tuple[GroupPlan, ...]  # in order of first mention (then groups only transforms read)
    by_backend: tuple[tuple[str, tuple[int, ...]], ...]  # backend -> indexes into groups
    join_keys: frozenset[str]
    # Values are merged group by group, then transform by transform; `reorder` picks the served ones in the
    # order asked (None: the merged row is the answer as it is).
    reorder: Callable[[Sequence[Any]], tuple[Any, ...]] | None
    transforms: tuple[TransformPlan, ...] = ()
    context: Mapping[str, DType] = field(default_factory=dict)  # the request fields the transforms need
    service: Service | None = None
    widths: tuple[int, ...] = ()  # values per column of a merged row: each group's, then each transform's


def make_plan(registry: Registry, features: Sequence[str], max_features: int, service: Service | None = None) -> Plan:
    """Resolve refs (`group:feature`, `group:*`, on-demand names) once; the plan is cached per feature list,
    or per service, whose defaults and max_age it applies."""
    if not features:
        raise ValidationFailed("ask for at least one feature", field="features")
    refs: list[str] = []
    for i, ref in enumerate(features):
        try:
            refs += registry.expand(ref)
        except ValueError as exc:
            raise ValidationFailed(str(exc), field=f"features[{i}]") from None
        if len(refs) > max_features:
            raise TooLarge(f"more than {max_features} features requested", field="features")
    positions: dict[str, list[int]] = {}  # group -> stored positions, served ones first
    served: list[tuple[str, int]] = []  # per served ref: (group or on-demand view, its slot there)
    views: dict[str, OnDemand] = {}
    for ref in refs:
        source, _, name = ref.partition(":")
        group = registry.groups.get(source)
        if group is not None:
            slots = positions.setdefault(source, [])
            slots.append(group.by_name[name].index)
            served.append((source, len(slots) - 1))
        else:
            view = views.setdefault(source, registry.on_demand[source])
            served.append((source, view.by_name[name].index))
    served_width = {g: len(slots) for g, slots in positions.items()}
    for view in views.values():  # what the transforms read, when not served already
        for ref in view.inputs:
            source, _, name = ref.partition(":")
            if source != REQUEST:
                index = registry.groups[source].by_name[name].index
                slots = positions.setdefault(source, [])
                if index not in slots:
                    slots.append(index)
    defaults = service.defaults if service else {}
    max_age = service.max_age_s if service else {}
    group_plans = tuple(
        GroupPlan.build(registry.groups[g], slots, defaults, max_age, served_width.get(g, 0))
        for g, slots in positions.items()
    )
    group_at = {gp.group.name: i for i, gp in enumerate(group_plans)}
    transforms = tuple(
        _transform_plan(view, group_plans, group_at, defaults, tuple(i for source, i in served if source == name))
        for name, view in views.items()
    )
    offsets: dict[str, int] = {}  # where each group's (then each transform's) values start in a merged row
    width = 0
    for name, w in [*((g, len(s)) for g, s in positions.items()), *((t.view.name, t.width) for t in transforms)]:
        offsets[name] = width
        width += w
    picked = [offsets[source] + slot for source, slot in served]
    by_backend: dict[str, list[int]] = {}
    for i, gp in enumerate(group_plans):
        by_backend.setdefault(gp.group.backend, []).append(i)
    context: dict[str, DType] = {}
    for view in views.values():
        context.update(view.request)
    return Plan(
        features=tuple(refs),
        groups=group_plans,
        by_backend=tuple((b, tuple(ix)) for b, ix in by_backend.items()),
        join_keys=frozenset(gp.group.entity.join_key for gp in group_plans),
        reorder=None if picked == list(range(width)) else _getter(picked),
        transforms=transforms,
        context=MappingProxyType(context),
        service=service,
        widths=(*(len(gp.positions) for gp in group_plans), *(tp.width for tp in transforms)),
    )


def _transform_plan(
    view: OnDemand,
    groups: Sequence[GroupPlan],
    group_at: Mapping[str, int],
    defaults: Mapping[str, Any],
    served: tuple[int, ...],
) -> TransformPlan:
    stored, request = [], []
    for ref in view.inputs:
        source, _, name = ref.partition(":")
        if source == REQUEST:
            request.append((ref, name))
        else:
            gp = groups[group_at[source]]
            stored.append((ref, group_at[source], gp.positions.index(gp.group.by_name[name].index)))
    served_defaults = tuple(defaults.get(f.ref, f.default) for f in view.outputs)
    width = len(served_defaults)
    return TransformPlan(
        view=view,
        stored=tuple(stored),
        request=tuple(request),
        defaults=served_defaults,
        unavailable=Cell(served_defaults, (UNAVAILABLE,) * width, None),
        statuses=MappingProxyType({status: (status,) * width for status in SEVERITY}),
        served=served,
    )
