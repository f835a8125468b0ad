"""Conversions between google.protobuf.Duration and the units LoadGen and netlink use."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration


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
