"""feature-gateway: one async endpoint that serves ML features; `write_features` loads DataFrames into it.

`from app import write_features` imports the loader only when asked for (the gateway never loads it, nor pandas
or pyspark, which that function takes but does not import either)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.loading.frames import write_features

__all__ = ["write_features"]


def __getattr__(name: str) -> Any:
    if name == "write_features":
        from app.loading.frames import write_features

        return write_features
    raise AttributeError(f"module 'app' has no attribute {name!r}")
