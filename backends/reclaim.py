"""Deleting reclaimable rows on a timer, for the SQL backends (Redis expires its keys itself).

Rows past their reclaim time already read MISSING (app/plan.py), so this only frees space; it runs on a
timer, not only when something is written, so a group nobody writes any more is cleaned too. Small batches,
spaced, so that reads never queue behind a purge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

BATCH = 1000
_PAUSE_S = 0.05
_MAX_BATCHES = 10_000  # per round: a huge backlog is worked off over several rounds


async def reclaim_loop(name: str, interval_s: float, delete_batch: Callable[[int], Awaitable[int]]) -> None:
    """Every `interval_s`, call `delete_batch(BATCH)` (rows deleted) until it deletes fewer than BATCH.

    Runs until cancelled; a failed round is logged and the next one tries again.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            for _ in range(_MAX_BATCHES):
                if await delete_batch(BATCH) < BATCH:
                    break
                await asyncio.sleep(_PAUSE_S)
        except Exception as exc:  # the loop outlives any one failure
            log.warning("backend %s: deleting reclaimable rows failed: %s", name, exc)
