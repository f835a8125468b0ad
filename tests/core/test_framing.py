"""The plain-TCP data plane's framing over a real socket pair."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from mecbench.core.framing import MAX_FRAME_BYTES, FrameError, read_frame, write_frame


def test_frames_round_trip_and_a_clean_end_reads_as_none() -> None:
    left, right = socket.socketpair()
    with left, right:
        reader = right.makefile("rb")

        def send() -> None:
            for payload in (b"", b"x", bytes(range(256)) * 1000):
                write_frame(left, payload)
            left.shutdown(socket.SHUT_WR)

        # A frame larger than the socket's buffer: the writer blocks until the reader reads.
        writer = threading.Thread(target=send)
        writer.start()
        assert [read_frame(reader), read_frame(reader), read_frame(reader)] == [
            b"", b"x", bytes(range(256)) * 1000
        ]
        assert read_frame(reader) is None
        writer.join()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "inside a frame header"),
        (struct.pack(">I", 10) + b"short", "5 bytes short"),
        (struct.pack(">I", MAX_FRAME_BYTES + 1), "over the limit"),
    ],
)
def test_a_broken_or_oversized_frame_is_an_error(raw: bytes, message: str) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(FrameError, match=message):
            read_frame(right.makefile("rb"))
