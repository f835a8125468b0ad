"""The pipe protocol between the agent and its session processes, typed.

Every message is one of the frozen dataclasses below: a `Command` goes agent -> worker (on the
worker's stdin), an `Event` worker -> agent (on its stdout; the worker points its own fd 1 at
stderr, so nothing else, such as LoadGen's prints, can corrupt the stream).

A frame is a 4-byte big-endian length and a pickle of `(PROTOCOL_VERSION, message)`. Both ends
are this package, started by the agent itself; even so the reader trusts nothing it gets: it
unpickles only this module's message classes (no other global is resolved), then checks the
version, the message's class against the direction's union and every field against its
annotation. Anything else is a `ProtocolError` (`ProtocolVersionError` for a worker of another
version), so nothing untyped crosses the pipe: `read_command` and `read_event` are the only
decode points, and `CommandWriter` / `EventWriter` send only their direction's messages.

Commands (agent -> worker): OpenSession (first and once), RunTest, CancelTest, CloseSession.
Events (worker -> agent): SessionReady or OpenFailed (answering OpenSession), TestStarted,
TestProgress, TestAborting, TestFinished, WorkerFatal.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
import types
import typing
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from mecbench.core import errors

# Raised when a message's shape changes; a worker of another version is refused at its first frame.
PROTOCOL_VERSION = 1

_HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ProtocolError(Exception):
    """A frame that is not one of this protocol's messages (or a stream cut inside one)."""


class ProtocolVersionError(ProtocolError):
    """The other end speaks another version of the protocol."""


# --- what crosses the pipe ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireError:
    """A domain error (`mecbench.core.errors`) on the pipe: its class name, message and, for
    InvalidArgument, its field violations."""

    kind: str
    message: str
    violations: tuple[tuple[str, str], ...] = ()

    # mecbench.core.errors is imported where it is used: it imports grpc, which this module (the
    # wire format) does not need, so a program that only speaks the protocol starts fast.

    @classmethod
    def of(cls, exc: errors.MecbenchError) -> WireError:
        from mecbench.core import errors

        violations = (
            tuple((v.field, v.description) for v in exc.violations) if isinstance(exc, errors.InvalidArgument) else ()
        )
        return cls(type(exc).__name__, str(exc), violations)

    def to_error(self) -> errors.MecbenchError:
        """The same class where the core defines it, else a plain MecbenchError."""
        from mecbench.core import errors

        kind: object = getattr(errors, self.kind, None)
        if kind is errors.InvalidArgument:
            return errors.InvalidArgument([errors.FieldViolation(f, d) for f, d in self.violations])
        if isinstance(kind, type) and issubclass(kind, errors.MecbenchError):
            return kind(self.message or "error in the LoadGen session process")
        return errors.MecbenchError(self.message or "error in the LoadGen session process")


# Commands -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSession:
    """The first command: load the dataset, connect to the SUT, answer SessionReady or OpenFailed."""

    session_id: str
    sut_address: str
    dataset: bytes  # a serialized common_pb2.DatasetSpec
    data_plane: bytes  # a serialized loadgen_agent_pb2.DataPlaneOptions
    progress_interval_s: float
    sut_connect_timeout_s: float
    log_level: str
    session_dir: str
    dataset_cache_dir: str
    max_dataset_bytes: int
    dataset_roots: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunTest:
    test_id: str
    settings: bytes  # a serialized common_pb2.LoadGenSettings
    outdir: str
    conf_dir: str
    record_latencies: bool = False


@dataclass(frozen=True, slots=True)
class CancelTest:
    test_id: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Exit now (LoadGen may be inside a test: the process does not wait for it)."""


Command = OpenSession | RunTest | CancelTest | CloseSession
_COMMANDS = (OpenSession, RunTest, CancelTest, CloseSession)

# Events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionReady:
    setup_time_s: float
    sample_count: int
    pid: int


@dataclass(frozen=True, slots=True)
class OpenFailed:
    error: WireError


@dataclass(frozen=True, slots=True)
class WorkerFatal:
    """An unexpected exception in the worker, just before it exits."""

    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class TestStarted:
    test_id: str
    start_time: float  # the worker's time.monotonic() (the agent's clock too: same host)
    effective_settings: str = ""


@dataclass(frozen=True, slots=True)
class TestProgress:
    test_id: str
    time: float  # time.monotonic()
    issued: int
    completed: int


@dataclass(frozen=True, slots=True)
class TestAborting:
    """The data plane gave up on the test (no response in time, a broken stream); LoadGen is being
    told every outstanding sample is done, TestFinished follows."""

    test_id: str
    error: WireError


@dataclass(frozen=True, slots=True)
class TestFinished:
    test_id: str
    ran: bool  # False: LoadGen never started (cancelled first, bad settings, the SUT gone)
    cancelled: bool = False
    error: WireError | None = None
    wall_s: float = 0.0
    batches_sent: int = 0
    samples_sent: int = 0
    sample_errors: int = 0
    first_sample_error: str = ""
    failed_samples_by_kind: tuple[tuple[str, int], ...] = ()
    sample_error_messages: tuple[str, ...] = ()
    llm_metrics: tuple[tuple[str, float], ...] = ()
    # The test's counts at its end; None where LoadGen never ran.
    issued: int | None = None
    completed: int | None = None
    # The timer slack LoadGen's issuing thread ran with, as the kernel reported it.
    issue_slack_ns: int = 0


Event = SessionReady | OpenFailed | WorkerFatal | TestStarted | TestProgress | TestAborting | TestFinished
_EVENTS = (SessionReady, OpenFailed, WorkerFatal, TestStarted, TestProgress, TestAborting, TestFinished)

# The only globals a frame may name.
_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (*_COMMANDS, *_EVENTS, WireError)}

# --- writing -----------------------------------------------------------------------------------


class _FrameWriter:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def _write(self, message: Command | Event) -> None:
        payload = pickle.dumps((PROTOCOL_VERSION, message), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._stream.write(_HEADER.pack(len(payload)) + payload)
            self._stream.flush()


class CommandWriter(_FrameWriter):
    """The agent's end: writes commands; safe to share between threads."""

    def send(self, command: Command) -> None:
        self._write(command)


class EventWriter(_FrameWriter):
    """The worker's end: writes events; safe to share between threads."""

    def send(self, event: Event) -> None:
        self._write(event)


# --- reading -----------------------------------------------------------------------------------


def read_command(stream: IO[bytes]) -> Command | None:
    """The next command, or None at end of stream; ProtocolError for anything else."""
    message = _read(stream)
    if message is None:
        return None
    if not isinstance(message, _COMMANDS):
        raise ProtocolError(f"a {type(message).__name__} where a command was expected")
    return message


def read_event(stream: IO[bytes]) -> Event | None:
    """The next event, or None at end of stream; ProtocolError for anything else."""
    message = _read(stream)
    if message is None:
        return None
    if not isinstance(message, _EVENTS):
        raise ProtocolError(f"a {type(message).__name__} where an event was expected")
    return message


def _read(stream: IO[bytes]) -> object:
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    size: int = _HEADER.unpack(header)[0]
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes is over the limit")
    payload = _read_exactly(stream, size)
    if payload is None:
        raise ProtocolError("stream ended inside a message")
    return _decode(payload)


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


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        cls = _CLASSES.get(name) if module == __name__ else None
        if cls is None:
            raise ProtocolError(f"a frame names {module}.{name}, not a message of this protocol")
        return cls


def _decode(payload: bytes) -> object:
    """The message of one frame, its version and every field checked: the protocol's one decode
    point, where what pickle returns (Any) becomes an object that isinstance checks narrow."""
    try:
        loaded: object = _Unpickler(io.BytesIO(payload)).load()
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        raise ProtocolError(f"a frame that is not a message ({type(exc).__name__}: {exc})") from None
    if not (isinstance(loaded, tuple) and len(loaded) == 2):
        raise ProtocolError(f"a frame of {type(loaded).__name__}, not (version, message)")
    version, message = typing.cast("tuple[object, object]", loaded)  # its length checked above
    if not isinstance(version, int):
        raise ProtocolError(f"a frame of {type(loaded).__name__}, not (version, message)")
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(f"protocol version {version}, this end speaks {PROTOCOL_VERSION}")
    if type(message) not in _CLASSES.values() or isinstance(message, WireError):
        raise ProtocolError(f"a frame of {type(message).__name__}, not a message")
    problem = _field_problem(message)
    if problem:
        raise ProtocolError(f"a {type(message).__name__} with {problem}")
    return message


# Each message class's field types, resolved once (the annotations are strings).
_HINTS: dict[type, dict[str, object]] = {cls: typing.get_type_hints(cls) for cls in _CLASSES.values()}


def _field_problem(message: object) -> str:
    """'' when every field of a message holds what its annotation says, else the first that does not."""
    for name, hint in _HINTS[type(message)].items():
        try:
            value: object = getattr(message, name)
        except AttributeError:
            return f"no {name}"
        if not _conforms(value, hint):
            return f"{name} of type {type(value).__name__}"
    return ""


def _conforms(value: object, hint: object) -> bool:
    origin: object = typing.get_origin(hint)
    args: tuple[object, ...] = typing.get_args(hint)
    if origin is types.UnionType or origin is typing.Union:
        return any(_conforms(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        items: tuple[object, ...] = value
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(item, args[0]) for item in items)
        return len(items) == len(args) and all(_conforms(item, arg) for item, arg in zip(items, args, strict=True))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bytes, bool):
        return type(value) is hint
    if isinstance(hint, type) and hint in _HINTS:  # a nested message (WireError)
        return type(value) is hint and not _field_problem(value)
    return False
