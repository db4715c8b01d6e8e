"""The stored layout: round trips, compactness, event-time ordering in raw bytes, growth of a group, and
blobs of the previous layout still served."""

from __future__ import annotations

import random
import struct

import msgspec
import pytest

from app.storage.codec import CodecError, parse_dtype
from app.storage.layout import GroupCodec, blob_event_us

ALL = ["bool", "int64", "float64", "string", "bytes", "float32[3]", "int64[2]", "float64"]


def stored(names: list[str], values: list[object]) -> list[object]:
    return [None if v is None else parse_dtype(n).check(v) for n, v in zip(names, values, strict=True)]


def registry_order(codec: GroupCodec, values: list[object]) -> list[object]:
    """Decoded values come in stored order (int64s, float64s, the rest); back to registry order."""
    return [values[codec.stored_index[i]] for i in range(codec.width)]


def test_round_trip_every_dtype() -> None:
    codec = GroupCodec([parse_dtype(n) for n in ALL])
    raw = [True, -(2**63), 0.1, "ünï ✓", b"\x00\xff", [0.5, -2.0, 3.25], [2**63 - 1, -1], -1e300]
    event_us, values = codec.decode(codec.encode(1_700_000_000_123_456, stored(ALL, raw)))
    assert event_us == 1_700_000_000_123_456
    assert registry_order(codec, values) == raw


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_with_nulls_and_extreme_ints(seed: int) -> None:
    rng = random.Random(seed)
    names = ["int64"] * 6 + ["float64"] * 4 + ["string", "float32[2]"]
    codec = GroupCodec([parse_dtype(n) for n in names])
    pool = [0, 1, -1, 2**63 - 1, -(2**63), 999, rng.randint(-(2**63), 2**63 - 1)]
    raw: list[object] = [rng.choice(pool + [None]) for _ in range(6)]
    raw += [rng.choice([0.0, -0.0, 1.5, 1e-308, None, rng.random()]) for _ in range(4)]
    raw += [rng.choice(["", "x", None]), rng.choice([[1.0, 2.0], None])]
    _, values = codec.decode(codec.encode(seed, stored(names, raw)))
    assert registry_order(codec, values) == raw


def test_event_time_bytes_sort_like_times() -> None:
    codec = GroupCodec([parse_dtype("int64")])
    times = [-(10**15), -1, 0, 1, 10**15, 1_700_000_000_000_000]
    blobs = [codec.encode(t, [1]) for t in times]
    assert sorted(blobs, key=lambda b: b[1:9]) == blobs
    assert [blob_event_us(b) for b in blobs] == times


def test_a_numeric_row_fits_redis_256_byte_class() -> None:
    """25 int64 in 0..999 and 25 float64: 248 bytes or less, so Redis stores it in a 256-byte allocation."""
    rng = random.Random(7)
    codec = GroupCodec([parse_dtype("int64")] * 25 + [parse_dtype("float64")] * 25)
    for _ in range(200):
        row = [rng.randint(0, 999) for _ in range(25)] + [rng.random() * 1000 for _ in range(25)]
        assert len(codec.encode(1_700_000_000_000_000, row)) <= 248


def test_a_group_that_gained_features_reads_old_blobs_as_null() -> None:
    old = GroupCodec([parse_dtype("int64"), parse_dtype("float64"), parse_dtype("string")])
    blob = old.encode(5, [7, 2.5, "a"])
    new = GroupCodec([parse_dtype(n) for n in ("int64", "float64", "string", "int64", "float64", "bool")])
    _, values = new.decode(blob)
    assert registry_order(new, values) == [7, 2.5, "a", None, None, None]


def test_layout_1_blobs_are_still_served() -> None:
    names = ["float64", "int64", "float32[2]", "string"]
    codec = GroupCodec([parse_dtype(n) for n in names])
    row = [1.5, 42, struct.pack("<2f", 0.5, 1.0), "s"]  # layout 1: MessagePack array, registry order
    blob = b"\x01" + (123 + (1 << 63)).to_bytes(8, "big") + msgspec.msgpack.encode(row)
    event_us, values = codec.decode(blob)
    assert event_us == 123
    assert registry_order(codec, values) == [1.5, 42, [0.5, 1.0], "s"]


@pytest.mark.parametrize("blob", [b"", b"\x03" + bytes(20), b"\x02" + bytes(8), b"\x02" + bytes(9) + b"\xff" * 12])
def test_unreadable_blobs_raise_codec_error(blob: bytes) -> None:
    codec = GroupCodec([parse_dtype("int64"), parse_dtype("float64")])
    with pytest.raises(CodecError):
        codec.decode(blob)


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("int64", 1.0),
        ("int64", "1"),
        ("float64", float("nan")),
        ("float64", float("inf")),
        ("bool", 0),
        ("string", 5),
        ("bytes", "%%%"),
        ("float32[2]", [1.0]),
        ("float32[2]", [1.0, 1e39]),
        ("int64[1]", [True]),
    ],
)
def test_values_that_do_not_fit_are_refused(dtype: str, value: object) -> None:
    with pytest.raises(CodecError):
        parse_dtype(dtype).check(value)
