"""Planning a fetch, once per distinct feature list: which groups, on which backends, which stored positions,
in what order to serve them; and turning one stored blob into one answer (a cell) with statuses and defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from app.errors import TooLarge, ValidationFailed
from app.registry.model import Group, Registry
from app.serving.statuses import EXPIRED, MISSING, PRESENT, UNAVAILABLE, Cell
from app.serving.usage import UsageCounts
from app.storage.codec import CodecError


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
    reclaim_us: (
        int  # ttl + grace (unused without a ttl): older values read MISSING, whether or not a backend has deleted them
    )
    # Feature usage of requests using this plan, counted in cells (one per row) for each of its features.
    # Counted here (bounded: plans are cached per feature list) and folded into per-feature totals on eviction.
    usage: UsageCounts

    @classmethod
    def build(cls, group: Group, positions: Sequence[int]) -> GroupPlan:
        defaults = tuple(group.by_index[p].default for p in positions)
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
            reclaim_us=group.reclaim_after_us or 0,
            usage=UsageCounts(),
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
        if None in picked:  # stored as null: that value was never given
            served, statuses = list(picked), list(self.present)
            for i, value in enumerate(picked):
                if value is None:
                    served[i], statuses[i] = self.defaults[i], MISSING
                    nulls[(self.group.name, self.positions[i])] += 1
            return Cell(tuple(served), tuple(statuses), event_us)
        return Cell(picked, self.present, event_us)


@dataclass(frozen=True, slots=True)
class Plan:
    features: tuple[str, ...]  # expanded refs, request order
    groups: tuple[GroupPlan, ...]  # in order of first mention
    by_backend: tuple[tuple[str, tuple[int, ...]], ...]  # backend -> indexes into groups
    join_keys: frozenset[str]
    reorder: Callable[[Sequence[Any]], tuple[Any, ...]] | None  # group-major -> request order; None if same


def make_plan(registry: Registry, features: Sequence[str], max_features: int) -> Plan:
    """Resolve `group:feature` / `group:*` refs once; the plan is cached per feature list."""
    if not features:
        raise ValidationFailed("ask for at least one feature", field="features")
    columns: list[tuple[str, int]] = []  # (group name, stored position) per served value
    for i, ref in enumerate(features):
        group_name, sep, name = ref.partition(":")
        group = registry.groups.get(group_name)
        if not sep or group is None:
            known = ", ".join(registry.groups)
            reason = "expected group:feature or group:*" if not sep else f"unknown group {group_name!r}"
            raise ValidationFailed(f"{reason}; groups: {known}", field=f"features[{i}]")
        if name == "*":
            columns += [(group_name, f.index) for f in group.features]
        elif name in group.by_name:
            columns.append((group_name, group.by_name[name].index))
        else:
            raise ValidationFailed(
                f"unknown feature {name!r} in group {group_name}; it has {', '.join(group.by_name)}",
                field=f"features[{i}]",
            )
        if len(columns) > max_features:
            raise TooLarge(f"more than {max_features} features requested", field="features")
    order: dict[str, list[int]] = {}
    served_at: dict[str, list[int]] = {}
    for column, (group_name, position) in enumerate(columns):
        order.setdefault(group_name, []).append(position)
        served_at.setdefault(group_name, []).append(column)
    group_plans = tuple(GroupPlan.build(registry.groups[g], positions) for g, positions in order.items())
    # Values are merged group by group; `reorder` moves each to the place it was asked in.
    group_major = [column for g in order for column in served_at[g]]
    inverse = [0] * len(columns)
    for merged_at, column in enumerate(group_major):
        inverse[column] = merged_at
    by_backend: dict[str, list[int]] = {}
    for i, gp in enumerate(group_plans):
        by_backend.setdefault(gp.group.backend, []).append(i)
    refs = tuple(f"{g}:{registry.groups[g].by_index[p].name}" for g, p in columns)
    return Plan(
        features=refs,
        groups=group_plans,
        by_backend=tuple((b, tuple(ix)) for b, ix in by_backend.items()),
        join_keys=frozenset(gp.group.entity.join_key for gp in group_plans),
        reorder=None if inverse == sorted(inverse) else _getter(inverse),
    )
