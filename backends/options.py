"""Checks for backend options, shared by the backend modules that declare their option schemas with them.

Each check takes the YAML value and returns the option's value, or raises ValueError with a reason the
registry prefixes with the option's path (`backends.hot.timeout_ms: expected a positive number`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from app.registry.durations import parse_duration

Check = Callable[[Any], Any]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@,]+)(?::(\d{1,5}))?$")


def url_hosts(url: str) -> list[tuple[str, int | None]]:
    """The (host, port) pairs of a URL; several where it lists them: `postgresql://u@h1:26257,h2:26257/db`.

    Raises ValueError naming the first that is not `host` or `host:port` (IPv6 in brackets).
    """
    hosts: list[tuple[str, int | None]] = []
    for item in urlsplit(url).netloc.rpartition("@")[2].split(","):
        match = _HOST.match(item)
        port = None if match is None or match[2] is None else int(match[2])
        if match is None or port == 0 or (port is not None and port > 65535):
            raise ValueError(f"{url!r}: {item!r} is not a host or host:port")
        hosts.append((unquote(match[1].strip("[]")), port))
    return hosts


def url(*schemes: str) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a URL string")
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ValueError(f"{value!r}: scheme must be one of {', '.join(schemes)}")
        if parts.scheme != "unix":
            if not parts.netloc:
                raise ValueError(f"{value!r} has no host")
            url_hosts(value)
        return value

    return check


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def positive(kind: type[int] | type[float]) -> Check:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError("expected a positive number")
        return kind(value)

    return check


def choice(*choices: str) -> Check:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return check


def identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ValueError("expected an SQL identifier (letters, digits, underscore)")
    return value


def file_path(value: Any) -> str:
    if not isinstance(value, str) or not value or value == ":memory:" or value.startswith("file:"):
        raise ValueError("expected a file path (the reader and writer threads share it, so not :memory:)")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def duration(value: Any) -> float:
    return parse_duration(value)
