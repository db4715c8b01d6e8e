"""Waiting for something observable to happen, instead of sleeping a time that a loaded box may overrun."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 5.0, interval: float = 0.05) -> None:
    """Await `check()` until it returns truthy or `within` seconds pass (then assert on its last answer)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            assert result, "condition not met in time"
            return
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], Any], within: float = 10.0, interval: float = 0.05, what: str = "") -> None:
    """Call `check()` until it returns truthy or `within` seconds pass (then fail, saying `what` was awaited)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what or 'condition'}"
        time.sleep(interval)
