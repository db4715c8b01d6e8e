"""Feature dtypes: parsing `float32[16]`, checking a JSON/YAML value against a dtype, and the stored form
of each value (see app/layout.py for how a group's values become one blob)."""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_FLOAT32_MAX = 3.4028234663852886e38
# JSON integers are unbounded; past these, float() raises OverflowError instead of rounding.
_INT_AS_FLOAT_MAX = int(sys.float_info.max)
_INT_AS_FLOAT_MIN = -_INT_AS_FLOAT_MAX


class CodecError(ValueError):
    """A value does not fit its dtype; the message says why (the caller adds where)."""


@dataclass(frozen=True, slots=True)
class DType:
    """A feature or entity dtype: `int64`, `float64`, `bool`, `string`, `bytes`, `float32[16]`, ..."""

    name: str
    kind: str  # bool | int64 | float64 | string | bytes | array
    item: str = ""  # array item: f (float32), d (float64), q (int64)
    length: int = 0

    def check(self, value: Any) -> Any:
        """Validate a JSON/YAML value and return its stored form. `None` is never passed here."""
        kind = self.kind
        if kind == "int64":
            if type(value) is not int:
                raise CodecError(f"expected an integer (int64), got {_type_name(value)}")
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise CodecError("integer out of int64 range")
            return value
        if kind == "float64":
            if type(value) is int:
                if not _INT_AS_FLOAT_MIN <= value <= _INT_AS_FLOAT_MAX:  # float() would raise OverflowError
                    raise CodecError("number out of float64 range")
                return float(value)
            if type(value) is not float:
                raise CodecError(f"expected a number (float64), got {_type_name(value)}")
            if not math.isfinite(value):
                raise CodecError("NaN and infinity are not stored; send null for no value")
            return value
        if kind == "bool":
            if type(value) is not bool:
                raise CodecError(f"expected true or false, got {_type_name(value)}")
            return value
        if kind == "string":
            if type(value) is not str:
                raise CodecError(f"expected a string, got {_type_name(value)}")
            return value
        if kind == "bytes":
            if type(value) is bytes:
                return value
            if type(value) is not str:
                raise CodecError(f"expected base64 text (bytes), got {_type_name(value)}")
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise CodecError("expected base64 text (bytes)") from None
        return self._check_array(value)

    def _check_array(self, value: Any) -> bytes:
        if type(value) is not list:
            raise CodecError(f"expected a list of {self.length} numbers ({self.name}), got {_type_name(value)}")
        if len(value) != self.length:
            raise CodecError(f"expected {self.length} items ({self.name}), got {len(value)}")
        if self.item == "q":
            for item in value:
                if type(item) is not int or not _INT64_MIN <= item <= _INT64_MAX:
                    raise CodecError(f"expected int64 items ({self.name}), got {_type_name(item)}")
        else:
            limit = _FLOAT32_MAX if self.item == "f" else math.inf
            for item in value:
                if type(item) not in (int, float):
                    raise CodecError(f"expected numeric items ({self.name}), got {_type_name(item)}")
                if type(item) is int and not _INT_AS_FLOAT_MIN <= item <= _INT_AS_FLOAT_MAX:
                    raise CodecError(f"item out of {self.name} range")
                if not math.isfinite(item) or abs(item) > limit:
                    raise CodecError(f"item {item!r} is not a finite {self.name} value")
        return struct.pack(f"<{self.length}{self.item}", *value)

    def served_column(self, values: list[Any]) -> list[Any] | None:
        """A whole column already in its served form, checked in C: the common homogeneous cases (floats, ints,
        bools, strings) answer the list itself; anything else (a null, a mix, an array dtype) answers None and the
        caller checks value by value, to name the first bad one. Used on request-time columns (context fields,
        on-demand outputs), where 100 rows x `check` per value cost as much as the rest of the transform."""
        types = set(map(type, values))
        kind = self.kind
        if kind == "float64" and types == {float}:
            return values if all(map(math.isfinite, values)) else None
        if kind == "int64" and types == {int}:
            return values if _INT64_MIN <= min(values) and max(values) <= _INT64_MAX else None
        if (kind == "bool" and types == {bool}) or (kind == "string" and types == {str}):
            return values
        return None

    def output(self, stored: Any) -> Any:
        """Stored form -> the value served (arrays back to lists)."""
        if self.kind == "array" and stored is not None:
            return list(struct.unpack(f"<{self.length}{self.item}", stored))
        return stored


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


_SCALARS = {name: DType(name, name) for name in ("bool", "int64", "float64", "string", "bytes")}
_ARRAY = re.compile(r"^(float32|float64|int64)\[(\d{1,5})\]$")
_ARRAY_ITEM = {"float32": "f", "float64": "d", "int64": "q"}
ENTITY_DTYPES = ("int64", "string")


def parse_dtype(text: str) -> DType:
    if text in _SCALARS:
        return _SCALARS[text]
    match = _ARRAY.match(text)
    if match and int(match[2]) > 0:
        return DType(text, "array", _ARRAY_ITEM[match[1]], int(match[2]))
    raise CodecError(
        f"unknown dtype {text!r}; known: bool, int64, float64, string, bytes, float32[N], float64[N], int64[N]"
    )
