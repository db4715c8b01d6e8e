"""The one vocabulary of an answer: a value's status, a backend read's outcome, a cell of served values.

Every reader uses these: the fetch path, usage counting, /metrics, /v1/usage, the status page and the Feast
translation (which maps Status to Feast's names in routers/feast_protocol.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from app.tiering.cache import CacheRead


class Status(StrEnum):
    """What a served value is; every value but PRESENT is its feature's declared default, except an on-demand
    output computed from inputs that were not all PRESENT: it is the value computed from their defaults, with
    the worst of their statuses (app/serving/transforms.py)."""

    PRESENT = "PRESENT"
    MISSING = "MISSING"  # never written, stored as null, or past its reclaim time (ttl + grace)
    EXPIRED = "EXPIRED"  # older than its group's ttl, not yet reclaimed
    UNAVAILABLE = "UNAVAILABLE"  # its backend failed, was skipped (open circuit) or missed the deadline


# The wire names as plain str, which is what cells hold: msgspec encodes an enum member at half the speed of a
# str (10,000 statuses, a 100 x 100 answer: 138 us instead of 70 us). Interned, so `status is PRESENT` holds.
PRESENT: str = Status.PRESENT.value
MISSING: str = Status.MISSING.value
EXPIRED: str = Status.EXPIRED.value
UNAVAILABLE: str = Status.UNAVAILABLE.value


class Outcome(StrEnum):
    """How one backend's read went in one request."""

    OK = "ok"
    ERROR = "error"  # it failed (or answered an error)
    TIMEOUT = "timeout"  # its own timeout, or the request's deadline cut it off
    OPEN = "open"  # its read circuit is open: not asked


class Cell(msgspec.Struct, frozen=True, gc=False):
    """One (group, entity) answer: the requested values, their statuses, the event time (None unless PRESENT).

    A msgspec Struct untracked by the garbage collector: a 100-entity fetch makes 200 of these, and as a
    NamedTuple (a tuple subclass the collector can never untrack) they cost 8% more instructions per request
    (callgrind, 100 x 100); a Struct costs about what a plain tuple does. It holds no reference cycle.
    """

    values: tuple[Any, ...]
    statuses: tuple[str, ...]  # Status wire names
    event_us: int | None


@dataclass(slots=True)
class BackendOutcome:
    """One backend's read in one request: how it went, how long it took, and what it gave."""

    status: Outcome = Outcome.OK
    ms: float = 0.0
    error: str | None = None
    cells: list[list[Cell]] | None = None  # per group of this backend, per unique key
    cache: list[CacheRead] | None = None  # how its groups' caches answered (app/tiering/cache.py)
    asked: bool = True  # False: every key was served from the caches, the backend was not asked
    # Keys of groups with local_cache_ms: held in this worker's memory, coalesced with another request's read,
    # missed (app/serving/local_cache.py); None: the read had no such group
    local: tuple[int, int, int] | None = None
