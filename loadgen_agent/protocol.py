"""The pipe protocol between the agent and its session processes.

Each message is a dict (op/ev names, numbers, strings, bytes of serialized protos), pickled and
framed by a 4-byte big-endian length. Both ends are this package, started by the agent itself, so
pickle carries no foreign input. The agent writes commands to the worker's stdin and reads events
from its stdout; the worker points its own fd 1 at stderr, so nothing else (LoadGen prints) can
corrupt the stream.

Commands (agent -> worker): `open`, `run`, `cancel`, `close`.
Events (worker -> agent): `ready`, `open_failed`, `started`, `progress`, `aborting`, `finished`,
`fatal`.
"""

from __future__ import annotations

import pickle
import struct
import threading
from typing import IO, Any

from mecbench.core import errors

Message = dict[str, Any]

_HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ProtocolError(Exception):
    pass


class MessageWriter:
    """Writes framed messages; safe to share between threads."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._stream.write(_HEADER.pack(len(payload)) + payload)
            self._stream.flush()


def read_message(stream: IO[bytes]) -> Message | None:
    """The next message, or None at end of stream."""
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes is over the limit")
    payload = _read_exactly(stream, size)
    if payload is None:
        raise ProtocolError("stream ended inside a message")
    message = pickle.loads(payload)
    if not isinstance(message, dict):
        raise ProtocolError("message is not a dict")
    return message


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            if chunks:
                raise ProtocolError("stream ended inside a message")
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def error_to_message(exc: errors.MecbenchError) -> Message:
    message: Message = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.InvalidArgument):
        message["violations"] = [(v.field, v.description) for v in exc.violations]
    return message


def error_from_message(message: Message) -> errors.MecbenchError:
    """The domain error a worker reported, as the same class where the core defines it."""
    kind = getattr(errors, str(message.get("type", "")), None)
    text = str(message.get("message", "error in the LoadGen session process"))
    if kind is errors.InvalidArgument:
        return errors.InvalidArgument([errors.FieldViolation(f, d) for f, d in message.get("violations", [])])
    if isinstance(kind, type) and issubclass(kind, errors.MecbenchError):
        return kind(text)
    return errors.MecbenchError(text)
