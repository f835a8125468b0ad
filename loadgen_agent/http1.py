"""A lean HTTP/1.1 client on asyncio protocols, for the direct client's hot path: keep-alive
connections in a pool, each request written as bytes built once per sample, the answer parsed
as it arrives (status line, headers, then a body framed by Content-Length, chunked transfer
coding, or the connection's end) and each piece of body handed to a callback inside
`data_received`, with no stream object, future or task wake-up per chunk.

An answer read to its end leaves its connection in the pool (unless it said `Connection:
close`); an answer abandoned half-way (cancelled, timed out, a callback raising) closes its
connection, so no later request reads its rest. No retries: a request that fails is a failed
sample, never silently resent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from typing import Any, cast

BodyCallback = Callable[[bytes], None]

_MAX_HEAD_BYTES = 64 * 1024


class HttpConnectionError(ConnectionError):
    """The connection broke or the answer was not HTTP/1.1 we can read."""


class Headers(dict[str, str]):
    """An answer's headers: names kept in lower case, looked up in any case."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class HttpAnswer:
    """An answer's status and headers, and its body when it was not handed to a callback (an
    error status's body is always kept here)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self.body = b""


def request_bytes(method: str, host: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """One request, whole, as it goes on the wire."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    skipped = {"host", "content-length"}
    lines.extend(f"{name}: {value}" for name, value in headers.items() if name.lower() not in skipped)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    # Parser states.
    _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _IDLE = range(8)

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._state = self._IDLE
        self._left = 0
        self._answer: HttpAnswer | None = None
        self._on_body: BodyCallback | None = None
        self._collected: list[bytes] = []
        self._future: asyncio.Future[HttpAnswer] | None = None
        self._keep_alive = True
        self.closed = False

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances, though they are ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._future is None:
            self.abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._buffer += data
        try:
            self._parse()
        except Exception as exc:  # noqa: BLE001 - a callback's or the parser's failure fails the request
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._pool.forget(self)
        if self._future is None:
            return
        if self._state == self._UNTIL_CLOSE:
            if self._buffer:
                self._deliver(bytes(self._buffer))
                self._buffer.clear()
            self._done()
            return
        reason = f": {exc}" if exc else ""
        self._fail(HttpConnectionError(f"the server closed the connection before the answer's end{reason}"))

    # A request -----------------------------------------------------------------------------

    def send(self, data: bytes, on_body: BodyCallback | None, future: asyncio.Future[HttpAnswer]) -> None:
        assert self.transport is not None and self._future is None
        self._future = future
        self._on_body = on_body
        self._state = self._HEAD
        self._answer = None
        self._collected = []
        self.transport.write(data)

    def abort(self) -> None:
        """Close the connection now (an answer abandoned half-way)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # The parser ----------------------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self._buffer
        while self._future is not None:
            state = self._state
            if state == self._HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD_BYTES:
                        raise HttpConnectionError("an answer's head is over 64 KiB")
                    return
                head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
                del buffer[: end + 4]
                self._head(head)
            elif state == self._LENGTH:
                if not buffer:
                    return
                if self._take_body(buffer):
                    self._done()
            elif state == self._CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                try:
                    self._left = int(size_text, 16)
                except ValueError:
                    raise HttpConnectionError(f"a chunk size is not hexadecimal: {size_text[:20]!r}") from None
                self._state = self._CHUNK_DATA if self._left else self._TRAILER
            elif state == self._CHUNK_DATA:
                if not buffer:
                    return
                if self._take_body(buffer):
                    self._state = self._CHUNK_END
            elif state == self._CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise HttpConnectionError("a chunk does not end with CRLF")
                del buffer[:2]
                self._state = self._CHUNK_SIZE
            elif state == self._TRAILER:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._done()
            elif state == self._UNTIL_CLOSE:
                if buffer:
                    self._deliver(bytes(buffer))
                    buffer.clear()
                return
            else:
                return

    def _head(self, head: list[str]) -> None:
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpConnectionError(f"not an HTTP/1.x status line: {head[0][:80]!r}")
        status = int(parts[1])
        headers = Headers()
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        self._answer = HttpAnswer(status, headers)
        if status >= 300:
            self._on_body = None  # an error's body is kept for its message
        connection = headers.get("connection", "").lower()
        self._keep_alive = parts[0] != "HTTP/1.0" or connection == "keep-alive"
        if connection == "close":
            self._keep_alive = False
        if status in (204, 304):
            self._done()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = self._CHUNK_SIZE
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise HttpConnectionError("Content-Length is not a number") from None
            self._state = self._LENGTH
            if not self._left:
                self._done()
        else:
            self._keep_alive = False
            self._state = self._UNTIL_CLOSE

    def _take_body(self, buffer: bytearray) -> bool:
        """Deliver what `buffer` holds of the body part still due (`_left` bytes); whether it is all in."""
        take = min(self._left, len(buffer))
        self._deliver(bytes(buffer[:take]))
        del buffer[:take]
        self._left -= take
        return not self._left

    def _deliver(self, data: bytes) -> None:
        if self._on_body is not None:
            self._on_body(data)
        else:
            self._collected.append(data)

    def _done(self) -> None:
        future, answer = self._future, self._answer
        self._future = None
        self._state = self._IDLE
        if self._buffer and self._keep_alive:
            self._keep_alive = False  # bytes past the answer's end: not ours to read
        if self._keep_alive and not self.closed:
            self._pool.release(self)
        elif not self.closed:
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        if future is not None and not future.done() and answer is not None:
            answer.body = b"".join(self._collected)
            future.set_result(answer)

    def _fail(self, exc: BaseException) -> None:
        future = self._future
        self._future = None
        self.abort()
        if future is not None and not future.done():
            future.set_exception(exc)


class Http1Pool:
    """Keep-alive connections to one server (`http` or `https`), any number at once: one
    request per connection at a time, an idle one reused first (the latest released)."""

    def __init__(self, host: str, port: int, tls: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl.create_default_context() if tls else None
        self._loop = loop
        self._idle: list[_Connection] = []
        self.opened = 0

    async def exchange(self, data: bytes, on_body: BodyCallback | None) -> HttpAnswer:
        """Send one request (request_bytes) and wait for its answer; the body goes to `on_body`
        piece by piece as it arrives (for a 2xx/1xx answer), else into HttpAnswer.body."""
        connection = None
        while self._idle:
            candidate = self._idle.pop()
            if not candidate.closed and candidate.transport is not None and not candidate.transport.is_closing():
                connection = candidate
                break
        if connection is None:
            _, connection = await self._loop.create_connection(
                lambda: _Connection(self), self.host, self.port, ssl=self._ssl
            )
            self.opened += 1
        future: asyncio.Future[HttpAnswer] = self._loop.create_future()
        connection.send(data, on_body, future)
        try:
            return await future
        except asyncio.CancelledError:
            if not future.done():
                connection.abort()  # abandoned half-way: never reused
            raise

    def release(self, connection: _Connection) -> None:
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.abort()
        self._idle.clear()
