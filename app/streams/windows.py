"""Sliding windows over time tiles: which tile size a window uses, and exactly which events its value counts.

A window of W seconds is kept in tiles of T seconds, the smallest of TILE_SIZES_S that divides W into at most
MAX_TILES tiles (10m: 10 s tiles, 1h: 1 min, 1d: 30 min, 7d: 3 h, 30d: 12 h), so a read merges at most 60 partial
aggregates per window, and a tile is the unit an event is merged into.

**The window rule.** Times are integer microseconds since the epoch; `floor_T(x)` is x rounded down to a multiple
of T. The value of a W window at time t counts every accepted event whose event time e satisfies

    floor_T(t) - W + T  <=  e  <  floor_T(t) + T

that is: the tile holding t and the W/T - 1 tiles before it. The window is exactly W long and slides in steps of
T: just after a tile boundary it reaches back W - T + (t - floor_T(t)) from t; an event stamped later than t but
inside t's tile (a clock a little ahead) is counted already.

**Lateness.** An event is accepted when it arrives no later than `allowed_lateness` after its event time
(`now - e <= lateness`, now being the time the gateway takes it in); a later one is counted as late and dropped,
never merged. Tiles are kept for the longest window plus the lateness: nothing older can be read or written.
"""

from __future__ import annotations

from dataclasses import dataclass

TILE_SIZES_S = (1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_TILES = 60
_S = 1_000_000


def tile_size_s(window_s: int) -> int:
    """The smallest tile size that divides the window into at most MAX_TILES tiles. ValueError when none does."""
    for size in TILE_SIZES_S:
        if window_s % size == 0 and window_s // size <= MAX_TILES:
            return size
    raise ValueError(
        f"a {window_s} s window cannot be cut into at most {MAX_TILES} equal tiles of "
        f"{', '.join(map(str, TILE_SIZES_S))} s; use a whole number of seconds up to 60 days, such as 10m, 1h, 1d, 7d"
    )


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # as written in the registry: "10m", "1h", "7d"; feature names end with it
    seconds: int
    tile_s: int

    @classmethod
    def of(cls, name: str, seconds: float) -> Window:
        whole = int(seconds)
        if whole != seconds or whole <= 0:
            raise ValueError(f"a window is a positive whole number of seconds, not {seconds:g}")
        return cls(name, whole, tile_size_s(whole))

    @property
    def tile_us(self) -> int:
        return self.tile_s * _S

    def tiles(self, at_us: int) -> range:
        """The starts (us) of the tiles the value at `at_us` merges, oldest first."""
        tile = self.tile_us
        current = at_us // tile * tile
        return range(current - self.seconds * _S + tile, current + 1, tile)

    def counts(self, at_us: int, event_us: int) -> bool:
        """Does the value at `at_us` count an event of time `event_us`? (The rule above, for tests and docs.)"""
        tile = self.tile_us
        current = at_us // tile * tile
        return current - self.seconds * _S + tile <= event_us < current + tile


def tile_start(event_us: int, tile_s: int) -> int:
    tile = tile_s * _S
    return event_us // tile * tile


def is_late(event_us: int, now_us: int, lateness_us: int) -> bool:
    return now_us - event_us > lateness_us
