"""Admission control: how much work one worker takes on at once, following the latency it measures.

Every request admitted waits in the one event loop with all the others, so past what the CPU can serve each
extra request makes every request slower, until all of them miss their deadline (congestion collapse: goodput
falls to zero while the box is busy). The limiter keeps the in-flight count near the point where latency starts
to rise and answers the rest at once with 503 and Retry-After, which costs far less than a late answer.

The limit follows the gradient rule of Netflix's concurrency-limits (Gradient2) and Envoy's adaptive-concurrency
filter. Per window of completed reads (at least `window_s` and `window_samples` of them):

    short    = the window's median latency, tail its 90th percentile
    floor    = the lowest window median of the last `floor_s` (re-learnt as old windows age out)
    gradient = clamp(max(tolerance * floor / short, deadline_share * deadline / tail), 0.5, 1)
    limit'   = limit * gradient + queue

where `deadline` is the 10th percentile of the deadlines asked in the window. While latency stays within
either bound the limit creeps up by `queue` per window; when the queue inside the worker pushes it past both,
the limit shrinks in proportion. The deadline term is what the clients say they can wait: a CPU-bound worker's
latency grows with every request it holds, so latency near the floor alone would admit a handful and refuse
the rest of a load it could serve in time (refusals are cheap, not free); a 90th percentile at half the
deadline keeps the tail within it. A worker that is not using half of its limit learns nothing about it (the
latency it sees is not the limit's doing), and the limit holds still.

Only fetches are timed: a write's latency is its batch size, not congestion. Writes are admitted against the
same limit but may hold at most `write_share` of it, so a bulk load cannot starve the models' reads (or, with a
share of 1, writes compete equally).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Work(StrEnum):
    """What a request is, for admission: reads are timed and may use the whole limit, writes a share."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    enabled: bool = True
    initial_limit: int = 16
    min_limit: int = 4
    max_limit: int = 512
    tolerance: float = 1.5  # latency up to this multiple of the floor is not congestion
    deadline_share: float = 0.5  # nor is a 90th percentile up to this share of the deadlines asked (p10)
    queue: float = 2.0  # how far the limit may grow per window when latency is within tolerance
    write_share: float = 0.5  # the share of the limit writes may hold
    window_s: float = 0.1
    window_samples: int = 20
    floor_s: float = 10.0


class Limiter:
    """In-flight bound of one worker. Not thread-safe: one per event loop, used from that loop only."""

    def __init__(self, policy: AdmissionPolicy | None = None, clock: Callable[[], float] = time.perf_counter):
        self.policy = policy = policy or AdmissionPolicy()
        self.clock = clock
        self.limit = float(policy.initial_limit)
        self.inflight = 0
        self.writes = 0  # of which writes
        self.shed = {Work.READ: 0, Work.WRITE: 0}
        self._samples: list[float] = []
        self._window_start = clock()
        self._peak = 0  # most in flight during the window
        self._deadlines: list[float] = []  # the deadlines the window's samples asked for
        self.typical_s = 0.0  # the last window's median: what a fetch takes now, once admitted
        self._medians: deque[tuple[float, float]] = deque()  # (window end, its median), the last floor_s

    def admits(self, work: Work) -> bool:
        """Would `acquire` take this now? (Cheap; for refusing before the request is parsed any further.)"""
        if self.inflight >= int(self.limit):
            return False
        return work is Work.READ or self.writes < max(1, int(self.limit * self.policy.write_share))

    def acquire(self, work: Work) -> bool:
        """Take a slot, or count a refusal and say no."""
        if not self.admits(work):
            self.shed[work] += 1
            return False
        self.inflight += 1
        if self.inflight > self._peak:
            self._peak = self.inflight
        if work is Work.WRITE:
            self.writes += 1
        return True

    def refused(self, work: Work) -> None:
        """Count a refusal decided elsewhere (`admits` said no before the request reached `acquire`)."""
        self.shed[work] += 1

    def release(self, work: Work, latency_s: float | None, deadline_s: float | None = None) -> None:
        """Give the slot back; `latency_s` is the time the request held it (None: not a sample), `deadline_s`
        the deadline it asked for."""
        self.inflight -= 1
        if work is Work.WRITE:
            self.writes -= 1
        elif latency_s is not None:
            self._samples.append(latency_s)
            if deadline_s is not None:
                self._deadlines.append(deadline_s)
        now = self.clock()
        if now - self._window_start >= self.policy.window_s and len(self._samples) >= self.policy.window_samples:
            self._update(now)

    def _update(self, now: float) -> None:
        policy = self.policy
        samples = sorted(self._samples)
        self.typical_s = short = samples[len(samples) // 2]
        tail = samples[len(samples) * 9 // 10]
        medians = self._medians
        medians.append((now, short))
        while medians[0][0] < now - policy.floor_s:
            medians.popleft()
        floor = min(m for _, m in medians)
        if self._peak * 2 >= self.limit and short > 0:  # else the limit was not what held latency where it is
            gradient = policy.tolerance * floor / short
            if self._deadlines:  # the 10th percentile: one client asking 1 ms does not set everyone's target
                deadline = sorted(self._deadlines)[len(self._deadlines) // 10]
                gradient = max(gradient, policy.deadline_share * deadline / tail)
            gradient = min(1.0, max(0.5, gradient))
            limit = self.limit * gradient + policy.queue
            self.limit = min(float(policy.max_limit), max(float(policy.min_limit), limit))
        self._samples.clear()
        self._deadlines.clear()
        self._window_start = now
        self._peak = self.inflight
