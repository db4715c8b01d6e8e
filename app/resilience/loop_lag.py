"""How late the event loop runs what is ready: the one measure of CPU starvation that a worker can take itself.

A task sleeps `interval_s` and notes how much later than asked it woke. While the loop is late, every reply a
backend sent sits unread for about that long, so a read that looks slow from the request's side may be the
loop's doing and not the backend's (see Gateway.blames, which asks for the worst lag during one read).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class LoopLag:
    def __init__(
        self,
        interval_s: float = 0.02,
        keep: int = 100,
        observe: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.interval_s = interval_s
        self.clock = clock
        self._lags: deque[tuple[float, float]] = deque(maxlen=keep)  # (woke at, lag): about the last 2 s
        self._observe = observe
        self._last = clock()  # when the probe last woke
        self._running = False

    def worst_since(self, since: float) -> float:
        """The worst lag of the probes that woke after `since`, counting one that is overdue right now (the
        loop may be stuck in a long turn, or the process not scheduled at all)."""
        # Overdue counts only while the probe runs (a gateway used for a bulk load never starts it).
        worst = self.clock() - self._last - self.interval_s if self._running else 0.0
        for woke, lag in reversed(self._lags):
            if woke < since:
                break
            worst = max(worst, lag)
        return max(0.0, worst)

    def recent_s(self) -> float:
        """The worst lag of about the last half second."""
        return self.worst_since(self.clock() - 0.5)

    def note(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self._lags.append((self.clock(), lag_s))
        if self._observe is not None:
            self._observe(lag_s)

    async def run(self) -> None:
        self._last = self.clock()
        self._running = True
        try:
            while True:
                asked = self.clock()
                await asyncio.sleep(self.interval_s)
                self._last = now = self.clock()
                self.note(now - asked - self.interval_s)
        finally:
            self._running = False
