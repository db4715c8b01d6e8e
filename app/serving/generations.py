"""Registry generations: what a request started on keeps serving it, while a reload swaps in the next one.

A reload (Gateway.reload) makes a new `Generation`: the registry and, per backend, the open client, its circuits and
read timeout. A request pins the generation it starts on (`Gateway.pinned`) and takes its backends from it, never
from the gateway by name later: after an `await` the gateway may already serve a newer registry, where that name is
another server or gone. A backend the new registry no longer uses (removed, or its spec changed) is retired with
the generation and closed once no request pinned to that generation or an older one is left; so an in-flight
request never finds its connection closed under it, and the close follows the last such request at once rather
than after a guessed grace period.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from app.registry.model import Registry
from app.resilience.breaker import Circuits
from backends.base import FeatureBackend

if TYPE_CHECKING:
    from app.serving.gateway import Gateway
    from app.serving.plan import Plan


@dataclass(frozen=True, slots=True, eq=False)
class Generation:
    """One registry and the backends opened for it. Never changed: a reload makes the next one."""

    number: int
    registry: Registry
    backends: dict[str, FeatureBackend]
    breakers: dict[str, Circuits]
    read_timeout_s: dict[str, float]


class InFlight:
    """Requests in flight per generation number, and what retired generations leave to release."""

    __slots__ = ("retired", "users")

    def __init__(self) -> None:
        self.users: dict[int, int] = {}
        self.retired: list[Retired] = []

    def drained(self, current: int) -> list[Retired]:
        """Take the retired generations no request can use any more: none pinned to them or to an older one."""
        oldest = min(self.users, default=current)
        done = []
        while self.retired and self.retired[0].generation < oldest:
            done.append(self.retired.pop(0))
        return done


class Pinned:
    """`with gateway.pinned() as generation:` counts a request on its generation until it ends (see module text).

    A class rather than a generator context manager: it is entered on every fetch and write."""

    __slots__ = ("_gateway", "generation")

    def __init__(self, gateway: Gateway, generation: Generation) -> None:
        self._gateway = gateway
        self.generation = generation

    def __enter__(self) -> Generation:
        users = self._gateway.in_flight.users
        number = self.generation.number
        users[number] = users.get(number, 0) + 1
        return self.generation

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._gateway.unpin(self.generation.number)


@dataclass(slots=True)
class Retired:
    """What generation `generation` leaves once its requests are over: backends to close, plans to fold. (Its stream
    monitor, if replaced, is closed at once: requests ask only the gateway's current one, and without I/O.)"""

    generation: int
    backends: list[tuple[str, FeatureBackend]]
    plans: list[Plan]


@dataclass(frozen=True, slots=True)
class Changes:
    """Names added, removed and changed between two registries' sections."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: Mapping[str, Any], new: Mapping[str, Any]) -> Changes:
        return cls(
            tuple(n for n in new if n not in old),
            tuple(n for n in old if n not in new),
            tuple(n for n in new if n in old and old[n] != new[n]),
        )

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "removed": list(self.removed), "changed": list(self.changed)}


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a reload changed. Backends: `opened` are new or changed specs (fresh clients and circuits), `retired`
    are removed or changed ones (closed once the requests started before the reload have finished), `kept` serve
    on with the same client, connections and circuits."""

    generation: int
    groups: Changes
    services: Changes
    on_demand: Changes
    streams: Changes
    opened: tuple[str, ...]
    retired: tuple[str, ...]
    kept: tuple[str, ...]
    freshness_restarted: bool
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.groups or self.services or self.on_demand or self.streams or self.opened or self.retired)

    def summary(self) -> str:
        """One line for the log."""
        parts = [
            f"{what} {verb} {', '.join(names)}"
            for what, changes in (
                ("groups", self.groups),
                ("services", self.services),
                ("on-demand", self.on_demand),
                ("streams", self.streams),
            )
            for verb, names in (("added", changes.added), ("removed", changes.removed), ("changed", changes.changed))
            if names
        ]
        if self.opened:
            parts.append(f"backends opened {', '.join(self.opened)}")
        if self.retired:
            parts.append(f"backends retired {', '.join(self.retired)}")
        return "; ".join(parts) or "nothing changed"
