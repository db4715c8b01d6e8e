"""Moving a group to another backend while it is served: `feature-gateway move GROUP --to BACKEND`.

The steps a careful operator takes, each recorded in the registry file (so every gateway, reloaded after it,
agrees) or in a state file beside it (so a move that stops is resumed by running the command again):

1. dual write: the group gains `moving_to: TARGET`; gateways write both copies before confirming a write and
   still read the old one;
2. backfill: every row of the old copy is written to the new one a page at a time (never replacing a newer
   row, so rows written meanwhile win); the scan's cursor is saved after each page;
3. verify: per key range (a hash of the key, 256 ranges) the count of rows and a checksum of their keys and
   event times on both sides; keys of a range that differs are compared one by one, and where the new copy
   is older or lacks the row it is copied again (a write racing the scan is not a difference: the new copy
   is then newer or equal);
4. cut reads over: `backend: TARGET, moving_from: SOURCE`: reads from the new copy, writes still reach both,
   so a gateway not yet reloaded (reading the old copy) still sees every write;
5. stop writing the old copy: `moving_from` removed;
6. optionally (`--delete-old`) the old copy's rows are deleted.

Between registry steps every gateway named is reloaded (POST /v1/admin/reload, which reaches all its
workers) and the move waits `settle_s` for requests that started before the reload to finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

from app.errors import RegistryError
from app.registry.edit import set_group_fields, write_atomically
from app.registry.load import load_registry, parse_registry
from app.registry.model import Group, Registry
from app.storage.layout import blob_event_us
from backends.base import FeatureBackend, Movable, WriteRow

RANGES = 256
_HORIZON_US = 600 * 1_000_000  # rows this close to their reclaim time are not compared
_MASK = (1 << 64) - 1


class MoveError(Exception):
    """The move cannot go on; the message says why and what to do. Nothing done so far is lost."""


@dataclass
class MoveState:
    """What a move has done, saved beside the registry after every step and page."""

    group: str
    source: str
    target: str
    phase: str = "dual_write"
    cursor: str | None = None
    copied: int = 0
    skipped_stale: int = 0
    repaired: int = 0
    deleted: int = 0
    checked: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Checksums:
    rows: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * RANGES)
    sums: list[int] = field(default_factory=lambda: [0] * RANGES)


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def key_range(key: str) -> int:
    return _digest(key)[0]


Reload = Callable[[], Awaitable[None]]
Progress = Callable[[str, int, int | None], None]  # (phase, done, total if known)


class Move:
    def __init__(
        self,
        registry_path: Path,
        group: str,
        target: str,
        *,
        env: dict[str, str],
        reload: Reload,
        settle_s: float,
        delete_old: bool = False,
        batch: int = 1000,
        progress: Progress | None = None,
        step: Callable[[str], None] | None = None,
    ):
        self.path = registry_path
        self.group_name = group
        self.target = target
        self.env = env
        self.reload = reload
        self.settle_s = settle_s
        self.delete_old = delete_old
        self.batch = batch
        self.progress = progress or (lambda phase, done, total: None)
        self.step = step or (lambda phase: None)
        self.state_path = registry_path.with_name(f".{registry_path.name}.move-{group}.json")
        self.backends: dict[str, FeatureBackend] = {}

    # -- state ---------------------------------------------------------------------------------------

    def _registry(self) -> Registry:
        return load_registry(self.path, self.env)

    def _load_state(self, registry: Registry) -> MoveState:
        group = registry.groups.get(self.group_name)
        if group is None:
            raise MoveError(f"unknown group {self.group_name!r}; groups: {', '.join(registry.groups)}")
        if group.streaming is not None:
            raise MoveError(f"{group.name} is an aggregation group: its tiles cannot be moved yet")
        if self.target not in registry.backends:
            raise MoveError(f"unknown backend {self.target!r}; backends: {', '.join(registry.backends)}")
        if self.state_path.exists():
            state = MoveState(**json.loads(self.state_path.read_text()))
            if (state.group, state.target) != (group.name, self.target):
                raise MoveError(
                    f"{self.state_path} records a move of {state.group} to {state.target}: finish it or remove the file"
                )
            return state
        if group.backend == self.target and group.moving_from is None:
            raise MoveError(f"{group.name} already lives on {self.target}")
        if group.moving_to not in (None, self.target) or group.moving_from is not None:
            raise MoveError(f"{group.name} is in another move ({group.moving_to or group.moving_from}) with no state")
        if group.cache is not None and group.cache.backend == self.target:
            raise MoveError(f"{self.target} is the cache of {group.name}: move it to another backend")
        from backends import KINDS

        source_spec, target_spec = registry.backends[group.backend], registry.backends[self.target]
        identity = KINDS[source_spec.type].identity
        if source_spec.type == target_spec.type and all(
            source_spec.options.get(o) == target_spec.options.get(o) for o in identity
        ):
            raise MoveError(
                f"backends {group.backend} and {self.target} hold their data in the same place; a move would "
                "copy the group onto itself (and --delete-old delete it)"
            )
        for name in (group.backend, self.target):
            kind = registry.backends[name]
            if kind.options.get("cluster"):
                raise MoveError(f"backend {name} is a Redis Cluster: moving to or from one is not supported yet")
        return MoveState(group.name, group.backend, self.target)

    def _save(self, state: MoveState) -> None:
        write_atomically(self.state_path, json.dumps(asdict(state), indent=1))

    # -- steps ---------------------------------------------------------------------------------------

    async def run(self) -> MoveState:
        registry = self._registry()
        state = self._load_state(registry)
        self._save(state)
        from backends import open_backend  # at run time: the backend modules import the registry's model

        try:
            for name in (state.source, state.target):
                self.backends[name] = open_backend(registry.backends[name], registry)
            await self.backends[state.target].migrate()
            steps: list[tuple[str, Callable[[MoveState], Awaitable[None]]]] = [
                ("dual_write", self._dual_write),
                ("backfill", self._backfill),
                ("verify", self._verify),
                ("cutover", self._cutover),
                ("finish", self._finish),
                ("delete", self._delete),
            ]
            names = [name for name, _ in steps]
            for name, step in steps[names.index(state.phase) :] if state.phase in names else []:
                started = time.monotonic()
                state.phase = name
                self._save(state)
                self.step(name)
                await step(state)
                state.seconds[name] = state.seconds.get(name, 0.0) + time.monotonic() - started
            state.phase = "done"
            self.state_path.unlink(missing_ok=True)
            return state
        finally:
            for backend in self.backends.values():
                await backend.aclose()

    async def _set_fields(self, changes: dict[str, str | None]) -> None:
        text = self.path.read_text(encoding="utf-8")
        edited = set_group_fields(text, self.group_name, changes, str(self.path))
        try:
            parse_registry(edited, str(self.path), self.env)
        except RegistryError as exc:
            raise MoveError(f"the edited registry would not load: {exc}") from None
        if edited != text:
            write_atomically(self.path, edited)
        await self.reload()
        await asyncio.sleep(self.settle_s)

    async def _dual_write(self, state: MoveState) -> None:
        await self._set_fields({"moving_to": state.target})

    def _group(self) -> Group:
        return self._registry().groups[self.group_name]

    async def _backfill(self, state: MoveState) -> None:
        group = self._group()
        source = cast("Movable", self.backends[state.source])
        target = self.backends[state.target]
        while True:
            page = await source.scan(group, state.cursor, self.batch)
            if page.rows:
                result = await cast("Movable", target).copy(group, _newest(page.rows))
                state.copied += result.written
                state.skipped_stale += result.skipped_stale
            state.cursor = page.cursor
            self._save(state)
            self.progress("backfill", state.copied + state.skipped_stale, None)
            if page.cursor is None:
                return

    async def _verify(self, state: MoveState) -> None:
        group = self._group()
        # Rows reaching their reclaim time before the verify could end are left out on both sides: one side may
        # delete them meanwhile (Redis expires the key, a SQL store keeps it until its cleanup)
        now_us = time.time_ns() // 1000 + _HORIZON_US
        source, target = (
            await self._checksums(group, state.source, now_us),
            await self._checksums(group, state.target, now_us),
        )
        bad = {r for r in range(RANGES) if (source.counts[r], source.sums[r]) != (target.counts[r], target.sums[r])}
        state.checked = source.rows
        if bad:
            keys = await self._keys_in(group, state.source, bad) | await self._keys_in(group, state.target, bad)
            state.repaired += await self._repair(group, state, sorted(keys))
        self._save(state)

    async def _checksums(self, group: Group, name: str, now_us: int) -> Checksums:
        backend = cast("Movable", self.backends[name])
        sums = Checksums()
        seen: set[str] | None = set() if self.backends[name].type == "redis" else None  # SCAN may repeat a key
        cursor = None
        while True:
            page = await backend.scan(group, cursor, self.batch)
            for row in page.rows:
                if _reclaimed(group, row, now_us):
                    continue  # past its reclaim time: one side may have deleted it already
                if seen is not None:
                    if row.key in seen:
                        continue
                    seen.add(row.key)
                digest = _digest(row.key)
                r = digest[0]
                sums.counts[r] += 1
                signature = hashlib.blake2b(row.blob, digest_size=8, key=digest).digest()
                sums.sums[r] = (sums.sums[r] + int.from_bytes(signature, "big")) & _MASK
                sums.rows += 1
            self.progress(f"verify {name}", sums.rows, None)
            cursor = page.cursor
            if cursor is None:
                return sums

    async def _keys_in(self, group: Group, name: str, ranges: set[int]) -> set[str]:
        backend = cast("Movable", self.backends[name])
        keys: set[str] = set()
        cursor = None
        while True:
            page = await backend.scan(group, cursor, self.batch)
            keys.update(row.key for row in page.rows if key_range(row.key) in ranges)
            cursor = page.cursor
            if cursor is None:
                return keys

    async def _repair(self, group: Group, state: MoveState, keys: list[str]) -> int:
        """Copy again the keys whose new copy is older or absent; MoveError if some still differ after."""
        source, target = self.backends[state.source], self.backends[state.target]
        repaired = 0
        for attempt in range(3):
            now_us = time.time_ns() // 1000 + _HORIZON_US
            behind: list[WriteRow] = []
            for start in range(0, len(keys), self.batch):
                chunk = keys[start : start + self.batch]
                [old] = await source.read([(group, chunk)])
                [new] = await target.read([(group, chunk)])
                for key, a, b in zip(chunk, old, new, strict=True):
                    if a is None or _reclaimed(group, _row(key, a), now_us):
                        continue  # gone from the old copy (deleted, reclaimed): nothing to carry
                    if (
                        b is None
                        or _row(key, b).event_us < _row(key, a).event_us
                        or (_row(key, b).event_us == _row(key, a).event_us and a != b)
                    ):
                        behind.append(_row(key, a))
            if not behind:
                return repaired
            if attempt == 2:
                raise MoveError(
                    f"{len(behind)} key(s) of {group.name} still differ after copying them again "
                    f"(first: {behind[0].key}); the move stopped before cutting reads over, run it again"
                )
            result = await cast("Movable", target).copy(group, behind)
            repaired += result.written
        return repaired

    async def _cutover(self, state: MoveState) -> None:
        await self._set_fields({"backend": state.target, "moving_to": None, "moving_from": state.source})

    async def _finish(self, state: MoveState) -> None:
        await self._set_fields({"moving_from": None})

    async def _delete(self, state: MoveState) -> None:
        if not self.delete_old:
            return
        group = self._group()
        source = cast("Movable", self.backends[state.source])
        cursor = None
        while True:
            page = await source.scan(group, cursor, self.batch)
            if page.rows:
                await source.delete(group, [row.key for row in page.rows])
                state.deleted += len(page.rows)
            self.progress("delete", state.deleted, state.checked or None)
            cursor = page.cursor
            if cursor is None:
                return


def _row(key: str, blob: bytes) -> WriteRow:
    return WriteRow(key, blob_event_us(blob), blob)


def _newest(rows: list[WriteRow]) -> list[WriteRow]:
    """One row per key (a Redis SCAN page may repeat one)."""
    newest: dict[str, WriteRow] = {}
    for row in rows:
        if row.key not in newest or newest[row.key].event_us < row.event_us:
            newest[row.key] = row
    return list(newest.values())


def _reclaimed(group: Group, row: WriteRow, now_us: int) -> bool:
    after = group.reclaim_after_us
    return after is not None and now_us - row.event_us > after


def describe(state: MoveState) -> list[str]:
    """The report `feature-gateway move` prints."""
    lines = [
        f"moved {state.group} from {state.source} to {state.target}: {state.copied:,} rows copied, "
        f"{state.skipped_stale:,} already newer there, {state.checked:,} verified, {state.repaired:,} copied again",
    ]
    if state.deleted:
        lines.append(f"deleted {state.deleted:,} rows of the old copy on {state.source}")
    lines.append("steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in state.seconds.items()))
    return lines
