"""The stored layout: round trips, event-time ordering in raw bytes, growth of a group."""

from __future__ import annotations

import pytest

from app.codec import CodecError, blob_event_us, encode_blob, make_decoder, parse_dtype


def test_round_trip_every_dtype() -> None:
    dtypes = [parse_dtype(n) for n in ("bool", "int64", "float64", "string", "bytes", "float32[3]", "int64[2]")]
    raw = [True, -(2**63), 0.1, "ünï ✓", b"\x00\xff", [0.5, -2.0, 3.25], [2**63 - 1, -1]]
    stored = [d.check(v) for d, v in zip(dtypes, raw, strict=True)]
    blob = encode_blob(1_700_000_000_123_456, stored)
    event_us, values = make_decoder(dtypes)(blob)
    assert event_us == 1_700_000_000_123_456
    assert values == raw


def test_event_time_bytes_sort_like_times() -> None:
    times = [-(10**15), -1, 0, 1, 10**15, 1_700_000_000_000_000]
    blobs = [encode_blob(t, [1]) for t in times]
    assert sorted(blobs, key=lambda b: b[1:9]) == blobs
    assert [blob_event_us(b) for b in blobs] == times


def test_a_group_that_gained_a_feature_reads_old_blobs_as_null() -> None:
    old = encode_blob(5, [1, 2.0])
    _, values = make_decoder([parse_dtype("int64"), parse_dtype("float64"), parse_dtype("string")])(old)
    assert values == [1, 2.0, None]


def test_compact_numeric_values() -> None:
    stored = [i % 1000 for i in range(25)] + [i / 7 for i in range(25)]
    assert len(encode_blob(0, stored)) <= 9 + 3 + 25 * 3 + 25 * 9


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
