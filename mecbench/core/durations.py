"""Conversions between google.protobuf.Duration / Timestamp and the units LoadGen and netlink use."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from mecbench.core.errors import InvalidArgument

# google.protobuf.Timestamp's own range: 0001-01-01 to 9999-12-31.
_TIMESTAMP_MIN_S = -62_135_596_800
_TIMESTAMP_MAX_S = 253_402_300_799


def to_ns(d: Duration) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def to_seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def from_ns(ns: int | float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(ns))
    return d


def from_seconds(seconds: float) -> Duration:
    return from_ns(round(seconds * 1e9))


def is_negative(d: Duration) -> bool:
    return d.seconds < 0 or d.nanos < 0


def timestamp_seconds(ts: Timestamp, field: str) -> float:
    """A request's Timestamp as Unix seconds; InvalidArgument naming `field` when it is out of
    the type's range (protobuf's own conversions raise ValueError there)."""
    if not _TIMESTAMP_MIN_S <= ts.seconds <= _TIMESTAMP_MAX_S or not 0 <= ts.nanos <= 999_999_999:
        raise InvalidArgument("not a valid timestamp (years 1 to 9999, nanos in [0, 1e9))", field=field)
    return ts.seconds + ts.nanos / 1e9
