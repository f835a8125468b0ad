"""The direct client's HTTP/1.1 client (loadgen_agent/http1.py): answers framed every way HTTP/1.1
frames them, cut into pieces anywhere, read to what their body is; connections kept alive when
the answer allows it and closed when it does not; a real server on loopback for the pool."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from loadgen_agent.http1 import Http1Pool, HttpAnswer, HttpConnectionError, _Connection, request_bytes


class _Transport:
    """What the parser writes to and closes, recorded (the parser is fed below byte by byte as
    a socket could cut its answer; the pool's test uses real sockets)."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _frame(body_pieces: list[bytes], framing: str, keep_alive: bool) -> bytes:
    body = b"".join(body_pieces)
    head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    if framing == "chunked":
        chunks = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in body_pieces if p)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\nX-Trailer: 1\r\n\r\n"
    if framing == "length":
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return (head + "\r\n").encode() + body  # to the connection's end


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=40), max_size=6),
    framing=st.sampled_from(["chunked", "length", "close"]),
    keep_alive=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=40),
    interim=st.booleans(),
)
def test_an_answer_cut_anywhere_reads_as_its_body(
    pieces: list[bytes], framing: str, keep_alive: bool, cuts: list[int], interim: bool
) -> None:
    loop = asyncio.new_event_loop()
    try:
        pool = Http1Pool("127.0.0.1", 1, False, loop)
        connection = _Connection(pool)
        transport = _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        future: asyncio.Future[HttpAnswer] = loop.create_future()
        received: list[bytes] = []
        connection.send(b"GET / HTTP/1.1\r\n\r\n", received.append, future)
        wire = (b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b"") + _frame(pieces, framing, keep_alive)
        at = 0
        for cut in [*cuts, len(wire)]:
            if at >= len(wire):
                break
            connection.data_received(wire[at : at + cut])
            at += cut
        if framing == "close":
            assert not future.done()
            connection.connection_lost(None)
        answer = future.result()
        assert answer.status == 200
        assert b"".join(received) == b"".join(pieces)
        reusable = keep_alive and framing != "close"
        # Closed by the client unless kept, or (framing "close") by the server already.
        assert transport.closed is not reusable or (framing == "close" and connection.closed)
        assert (connection in pool._idle) is reusable
    finally:
        loop.close()


def test_an_answer_broken_off_fails_and_its_connection_is_not_reused() -> None:
    loop = asyncio.new_event_loop()
    try:
        pool = Http1Pool("127.0.0.1", 1, False, loop)
        connection = _Connection(pool)
        connection.connection_made(_Transport())  # type: ignore[arg-type]
        future: asyncio.Future[HttpAnswer] = loop.create_future()
        connection.send(b"GET / HTTP/1.1\r\n\r\n", None, future)
        connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        connection.connection_lost(None)
        assert isinstance(future.exception(), HttpConnectionError)
        assert connection not in pool._idle
        bad: asyncio.Future[HttpAnswer] = loop.create_future()
        other = _Connection(pool)
        other.connection_made(_Transport())  # type: ignore[arg-type]
        other.send(b"GET / HTTP/1.1\r\n\r\n", None, bad)
        other.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert isinstance(bad.exception(), HttpConnectionError)
    finally:
        loop.close()


def test_the_pool_keeps_connections_alive_against_a_real_server() -> None:
    """Sequential requests reuse one connection; an error status's body comes back whole; a
    `Connection: close` answer is read and its connection not reused; concurrent requests each
    get their own connection."""

    async def scenario() -> dict[str, Any]:
        accepted = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                             .split(b":")[1])
                body = await reader.readexactly(length)
                if body == b"error":
                    writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
                elif body == b"close":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye")
                    await writer.drain()
                    writer.close()
                    return
                elif body == b"slow":
                    await asyncio.sleep(0.05)
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nslow\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Http1Pool("127.0.0.1", port, False, asyncio.get_running_loop())

        def request(body: bytes) -> bytes:
            return request_bytes("POST", f"127.0.0.1:{port}", "/x", body, {"Content-Type": "text/plain"})

        bodies = [(await pool.exchange(request(b"hi"), None)).body for _ in range(20)]
        sequential_opened = pool.opened
        error = await pool.exchange(request(b"error"), None)
        closing = await pool.exchange(request(b"close"), None)
        after_close = await pool.exchange(request(b"hi"), None)
        concurrent = await asyncio.gather(*(pool.exchange(request(b"slow"), None) for _ in range(5)))
        pool.close()
        server.close()
        await server.wait_closed()
        return {
            "bodies": bodies, "sequential_opened": sequential_opened, "error": error, "closing": closing,
            "after_close": after_close, "concurrent": concurrent, "opened": pool.opened, "accepted": accepted,
        }

    seen = asyncio.run(scenario())
    assert seen["bodies"] == [b"ok"] * 20 and seen["sequential_opened"] == 1
    assert (seen["error"].status, seen["error"].body) == (503, b"busy")
    assert seen["error"].headers["Content-Length"] == seen["error"].headers.get("content-length") == "4"
    assert (seen["closing"].status, seen["closing"].body) == (200, b"bye")
    assert seen["after_close"].body == b"ok"
    assert [a.body for a in seen["concurrent"]] == [b"slow"] * 5
    # 1 kept alive for 22 requests, 1 after the server closed it, 4 more for 5 at once.
    assert seen["opened"] == seen["accepted"] == 6
