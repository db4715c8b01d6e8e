"""How late the event loop runs what is ready: the one measure of CPU starvation that a worker can take itself.

A task sleeps `interval_s` and notes how much later than asked it woke. While the loop is late, every reply a
backend sent sits unread for about that long, so a read that looks slow from the request's side may be the
loop's doing and not the backend's (see Gateway.blames). `recent_s` is the worst lag of the last few probes:
a deadline cut-off is judged against it.
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
        keep: int = 25,
        observe: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.interval_s = interval_s
        self.clock = clock
        self._lags: deque[float] = deque(maxlen=keep)  # about the last half second
        self._observe = observe
        self._last = clock()  # when the probe last woke

    def recent_s(self) -> float:
        """The worst lag lately, counting a probe that is overdue right now (the loop may be stuck in it)."""
        overdue = self.clock() - self._last - self.interval_s
        return max(overdue, max(self._lags, default=0.0))

    def note(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self._lags.append(lag_s)
        if self._observe is not None:
            self._observe(lag_s)

    async def run(self) -> None:
        self._last = self.clock()
        while True:
            asked = self.clock()
            await asyncio.sleep(self.interval_s)
            self._last = now = self.clock()
            self.note(now - asked - self.interval_s)
