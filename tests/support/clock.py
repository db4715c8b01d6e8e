"""A clock for code that takes one (`clock=`), so that a test decides when time passes instead of sleeping."""

from __future__ import annotations


class ManualClock:
    """A monotonic clock that stands still until the test advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds
