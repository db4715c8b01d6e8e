"""Durations as the registry writes them: `90s`, `15m`, `1h`, `30d`, `2w`, `500ms`, or a number of seconds."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any, *, zero: bool = False) -> float:
    """`90s`, `15m`, `1h`, `30d`, `2w`, `500ms`, or a number of seconds; positive (or 0 with `zero`)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m, 1h, 30d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 90s, 15m, 1h, 30d")
        seconds = float(match[1]) * _UNITS[match[2]]
    if zero and not 0 <= seconds < float("inf"):
        raise ValueError("expected a duration of 0 or more")
    if not zero and not 0 < seconds < float("inf"):
        raise ValueError("a ttl must be positive (omit it for values that never expire)")
    return seconds
