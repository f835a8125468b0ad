"""Length-prefixed messages over a byte stream: the plain-TCP data plane's wire format.

Each frame is a 4-byte big-endian length, then that many bytes (a serialized protobuf message).
A clean end of stream between frames reads as None; an end inside a frame, or a length over
the bound, is an error, so a peer cannot make the reader allocate without limit.
"""

from __future__ import annotations

import struct
from typing import Protocol

from google.protobuf.duration_pb2 import Duration

from mecbench.core import durations

MAX_FRAME_BYTES = 256 * 1024 * 1024
# The longest wait a DataPlaneOptions field may add to a sample (min_frame_interval: until the next
# message; issue_slack: until LoadGen's issuing thread wakes).
MAX_ADDED_WAIT_S = 1.0
ADDED_WAIT_RULE = f"must be from 0 to {MAX_ADDED_WAIT_S:g} s"
ADDED_WAIT_FIELDS = ("min_frame_interval", "issue_slack")


def added_wait_allowed(wait: Duration) -> bool:
    """Whether a DataPlaneOptions field of ADDED_WAIT_FIELDS may be `wait` (ADDED_WAIT_RULE)."""
    return not durations.is_negative(wait) and durations.to_seconds(wait) <= MAX_ADDED_WAIT_S


_LENGTH = struct.Struct(">I")


class FrameWriter(Protocol):
    """A connected socket, or mecbench.core.tls.TlsStream."""

    def sendall(self, data: bytes, /) -> None: ...


class FrameReader(Protocol):
    """A socket's buffered reader (`makefile("rb")`), or mecbench.core.tls.TlsStream."""

    def read(self, size: int, /) -> bytes: ...


class FrameError(ValueError):
    """The stream broke inside a frame, or announced one over MAX_FRAME_BYTES."""


def write_frame(connection: FrameWriter, payload: bytes) -> None:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"a frame of {len(payload)} bytes is over the limit of {MAX_FRAME_BYTES}")
    # One send for header and payload: two small writes would cost two segments (NODELAY).
    connection.sendall(_LENGTH.pack(len(payload)) + payload)


def read_frame(reader: FrameReader) -> bytes | None:
    header = reader.read(_LENGTH.size)
    if not header:
        return None
    if len(header) < _LENGTH.size:
        raise FrameError("the stream ended inside a frame header")
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"a frame of {length} bytes is over the limit of {MAX_FRAME_BYTES}")
    payload = reader.read(length)
    if len(payload) < length:
        raise FrameError(f"the stream ended {length - len(payload)} bytes short of a frame")
    return payload
