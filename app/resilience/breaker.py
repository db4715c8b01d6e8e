"""Circuit breakers, two per backend (reads and writes): after N consecutive failures the backend is skipped
(its features served UNAVAILABLE at once, costing about 0 ms instead of its timeout; writes refused) until a
single probe after `reset_s` succeeds.

closed --N failures--> open --reset_s passes--> half-open (one probe) --success--> closed
                         ^                                               |
                         +------------------failure or cancelled---------+

Reads and writes have a breaker each: a write can fail where reads are fine (rows locked by another writer, a
read-only replica, a full disk), and refusing every model its features because a batch job's writes time out
turns a pipeline's trouble into an outage. A backend that is really down fails both, and opens both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class CircuitBreaker:
    def __init__(self, failures: int = 5, reset_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self.state: CircuitState = CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open, only the one probe may."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.reset_s:
            self.state = HALF_OPEN
            return True
        return False

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.state = OPEN
            self.opened_at = self.clock()

    def abandoned(self) -> None:
        """The call was cancelled by the request's deadline: says nothing of the backend, except that a probe
        did not prove it healthy (so a half-open circuit opens again rather than staying stuck)."""
        if self.state == HALF_OPEN:
            self.state = OPEN
            self.opened_at = self.clock()


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failures: int = 5  # consecutive failures that open a circuit
    reset_s: float = 1.0  # how long an open circuit waits before one probe
    slow_ms: float = 50.0  # a read the request's deadline cut off after this long counts as a failure


class Circuits(NamedTuple):
    """A backend's two breakers."""

    read: CircuitBreaker
    write: CircuitBreaker

    @classmethod
    def make(cls, policy: BreakerPolicy) -> Circuits:
        return cls(CircuitBreaker(policy.failures, policy.reset_s), CircuitBreaker(policy.failures, policy.reset_s))
