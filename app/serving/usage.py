"""Feature usage counts: how often a feature was asked for, and how its values were served (by status).

One type for every reader: the plan counts into it on the hot path, the metrics fold and merge it across
plans and workers, and /v1/usage, /metrics and the status page report it (with the one default-rate formula).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.serving.statuses import EXPIRED, MISSING, PRESENT, Status


@dataclass(slots=True)
class UsageCounts:
    requests: int = 0  # fetch requests that asked for it
    present: int = 0  # values served, by status
    missing: int = 0
    expired: int = 0
    unavailable: int = 0

    def count(self, status: str) -> None:
        """One value served with `status` (a Status wire name)."""
        if status is PRESENT:
            self.present += 1
        elif status is MISSING:
            self.missing += 1
        elif status is EXPIRED:
            self.expired += 1
        else:
            self.unavailable += 1

    def add(self, other: UsageCounts) -> None:
        self.requests += other.requests
        self.present += other.present
        self.missing += other.missing
        self.expired += other.expired
        self.unavailable += other.unavailable

    def copy(self) -> UsageCounts:
        return UsageCounts(self.requests, self.present, self.missing, self.expired, self.unavailable)

    @property
    def values(self) -> int:
        return self.present + self.missing + self.expired + self.unavailable

    def by_status(self) -> dict[Status, int]:
        return {
            Status.PRESENT: self.present,
            Status.MISSING: self.missing,
            Status.EXPIRED: self.expired,
            Status.UNAVAILABLE: self.unavailable,
        }

    def default_rate(self) -> float | None:
        """The share of values served as the default (anything not PRESENT); None when none was served."""
        values = self.values
        return round((values - self.present) / values, 4) if values else None

    def to_list(self) -> list[int]:
        """For the snapshots workers share (JSON)."""
        return [self.requests, self.present, self.missing, self.expired, self.unavailable]

    @classmethod
    def from_list(cls, counts: list[int]) -> UsageCounts:
        return cls(*counts)
