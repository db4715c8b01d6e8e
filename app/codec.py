"""Feature dtypes and the stored value layout, shared by every backend.

One blob per (group, entity):

    byte 0      layout version (1)
    bytes 1-8   event time, microseconds since the epoch + 2**63, big-endian
                (so comparing the 8 raw bytes orders event times: Redis' write script relies on it)
    bytes 9-    MessagePack array of the group's values in registry order; null = no value.
                Arrays (embeddings) are one `bin` of packed little-endian numbers.

Backends store and return blobs; they never look inside except at the event time bytes.
A group may gain features at its end: older blobs decode with null (MISSING) for them.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

LAYOUT_VERSION = 1
_TS_BIAS = 1 << 63
_HEADER = 9
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_FLOAT32_MAX = 3.4028234663852886e38

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


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
                if not math.isfinite(item) or abs(item) > limit:
                    raise CodecError(f"item {item!r} is not a finite {self.name} value")
        return struct.pack(f"<{self.length}{self.item}", *value)

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


def encode_blob(event_us: int, stored_values: Sequence[Any]) -> bytes:
    return b"\x01" + (event_us + _TS_BIAS).to_bytes(8, "big") + _encoder.encode(stored_values)


def blob_event_us(blob: bytes) -> int:
    return int.from_bytes(blob[1:_HEADER], "big") - _TS_BIAS


def make_decoder(dtypes: Sequence[DType]) -> Callable[[bytes], tuple[int, list[Any]]]:
    """A decoder for one group's blobs: blob -> (event time in us, served values in registry order)."""
    width = len(dtypes)
    arrays = [(i, struct.Struct(f"<{d.length}{d.item}").unpack) for i, d in enumerate(dtypes) if d.kind == "array"]
    decode = _decoder.decode

    def decode_blob(blob: bytes) -> tuple[int, list[Any]]:
        if blob[0] != LAYOUT_VERSION:
            raise CodecError(f"unknown layout version {blob[0]}")
        values = decode(memoryview(blob)[_HEADER:])
        if type(values) is not list:
            raise CodecError("payload is not an array")
        if len(values) != width:
            # Features were appended to the group since this blob was written, or removed from its end.
            values = (values + [None] * width)[:width]
        for i, unpack in arrays:
            if values[i] is not None:
                values[i] = list(unpack(values[i]))
        return int.from_bytes(blob[1:_HEADER], "big") - _TS_BIAS, values

    return decode_blob
