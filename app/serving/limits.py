"""The limits the serving core enforces, decided by the composition root (from settings) and passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_entities: int = 1000  # rows per fetch
    max_features: int = 500  # per fetch, after expanding group:*
    max_write_rows: int = 10_000
    max_key_length: int = 256  # longest string entity id
    default_deadline_ms: float = 100.0  # a fetch's deadline when it sets none
    max_deadline_ms: float = 10_000.0
    write_timeout_ms: float = 5_000.0
    max_future_event_ms: float = 300_000.0  # how far ahead of the clock a written event time may be
