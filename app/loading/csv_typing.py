"""CSV is text: cells are typed by the group's dtypes in `from_text` (the one place that does it)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from app.errors import ValidationFailed
from app.registry.model import Group
from app.serving.write import EVENT_TIMESTAMP
from app.storage.codec import CodecError, DType

_INT = re.compile(r"^\s*[+-]?\d+\s*$")
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n"})


def _quote(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def from_text(dtype: DType, text: str) -> Any:
    """One CSV cell -> the JSON value the write path validates, by dtype. An empty cell is null.

    Only parses: the dtype's own checks (ranges, finite numbers, array lengths, base64) stay in the write path.
    int64 `3`, float64 `2.5` / `1e-3`, bool `true/false/1/0/yes/no` (any case), string and bytes (base64)
    as they are, arrays as JSON text `[0.5, 1.0]`.
    """
    if text == "":
        return None
    kind = dtype.kind
    if kind == "int64":
        if not _INT.match(text):
            raise CodecError(f"expected an integer (int64), got {_quote(text)}")
        return int(text)
    if kind == "float64":
        try:
            if "_" in text:  # Python's float() takes 1_000; a CSV writer never means it
                raise ValueError
            return float(text)
        except ValueError:
            raise CodecError(f"expected a number (float64), got {_quote(text)}") from None
    if kind == "bool":
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise CodecError(f"expected true or false, got {_quote(text)}")
    if kind in ("string", "bytes"):
        return text
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise CodecError(f"expected a JSON array such as [0.5, 1.0] ({dtype.name}), got {_quote(text)}") from None


class CsvTyping:
    """Types the cells of one CSV header's rows: join key by the entity dtype, features by theirs."""

    def __init__(self, group: Group, header: Sequence[str]):
        self.header = list(header)
        self.dtypes: list[DType | None] = []
        for name in header:
            if name == group.entity.join_key:
                self.dtypes.append(group.entity.dtype)
            elif name == EVENT_TIMESTAMP:
                self.dtypes.append(None)  # RFC 3339 text, checked by the write path
            else:
                self.dtypes.append(group.by_name[name].dtype)

    def row(self, cells: Sequence[str]) -> dict[str, Any]:
        """Raises ValidationFailed naming the column of the first cell that is not of its dtype."""
        if len(cells) != len(self.header):
            raise ValidationFailed(f"has {len(cells)} cells; the header has {len(self.header)}", field="(row)")
        values: dict[str, Any] = {}
        for name, dtype, text in zip(self.header, self.dtypes, cells, strict=True):
            if dtype is None:
                values[name] = text or None
                continue
            try:
                values[name] = from_text(dtype, text)
            except CodecError as exc:
                raise ValidationFailed(str(exc), field=name) from None
        return values
