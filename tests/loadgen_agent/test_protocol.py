"""The pipe protocol between the LoadGen agent and its session processes, over a real pipe."""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from loadgen_agent import protocol
from mecbench.core import errors
from tests.loadgen_agent import fake_worker


@pytest.fixture
def pipe() -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb", buffering=0) as reader, os.fdopen(write_fd, "wb", buffering=0) as writer:
        yield reader, writer


COMMANDS: list[protocol.Command] = [
    protocol.OpenSession(
        session_id="ls-1",
        sut_address="127.0.0.1:9",
        dataset=b"\x08\x01",
        data_plane=b"",
        progress_interval_s=0.5,
        sut_connect_timeout_s=30,
        log_level="info",
        session_dir="/tmp/s",
        dataset_cache_dir="",
        max_dataset_bytes=1 << 40,
        dataset_roots=("/data", "/more"),
    ),
    protocol.RunTest("t-1", b"\x10\x02", "/tmp/s/tests/1", "/tmp/s/conf", record_latencies=True),
    protocol.CancelTest("t-1"),
    protocol.CloseSession(),
]

EVENTS: list[protocol.Event] = [
    protocol.SessionReady(0.25, 1024, 4242),
    protocol.OpenFailed(protocol.WireError.of(errors.InvalidArgument("must be HOST:PORT", "sut_address"))),
    protocol.WorkerFatal("RuntimeError: boom", "Traceback ..."),
    protocol.TestStarted("t-1", 12.5, "scenario: Offline"),
    protocol.TestProgress("t-1", 13.0, 100, 90),
    protocol.TestAborting("t-1", protocol.WireError.of(errors.DeadlineExceeded("no response for 60s"))),
    protocol.TestFinished("t-1", ran=False, cancelled=True),
    protocol.TestFinished(
        "t-1",
        ran=True,
        error=protocol.WireError.of(errors.Unavailable("stream broke")),
        wall_s=1.5,
        batches_sent=3,
        samples_sent=300,
        sample_errors=2,
        first_sample_error="HTTP 500",
        failed_samples_by_kind=(("http_500", 2),),
        sample_error_messages=("HTTP 500: oops",),
        llm_metrics=(("ttft_p50_s", 0.12),),
        issued=300,
        completed=300,
    ),
]


def test_every_message_crosses_the_pipe_unchanged(pipe: tuple[IO[bytes], IO[bytes]]) -> None:
    reader, writer = pipe
    commands, events = protocol.CommandWriter(writer), protocol.EventWriter(writer)

    def write() -> None:  # from another thread: a pipe's buffer is smaller than some messages
        for command in COMMANDS:
            commands.send(command)
        for event in EVENTS:
            events.send(event)
        writer.close()

    writing = threading.Thread(target=write)
    writing.start()
    assert [protocol.read_command(reader) for _ in COMMANDS] == COMMANDS
    assert [protocol.read_event(reader) for _ in EVENTS] == EVENTS
    assert protocol.read_event(reader) is None  # end of stream
    writing.join()


def test_a_command_is_no_event_and_an_event_no_command() -> None:
    command = io.BytesIO()
    protocol.CommandWriter(command).send(protocol.CancelTest("t"))
    with pytest.raises(protocol.ProtocolError, match="a CancelTest where an event was expected"):
        protocol.read_event(io.BytesIO(command.getvalue()))
    event = io.BytesIO()
    protocol.EventWriter(event).send(protocol.SessionReady(0.1, 1, 1))
    with pytest.raises(protocol.ProtocolError, match="a SessionReady where a command was expected"):
        protocol.read_command(io.BytesIO(event.getvalue()))


def test_domain_errors_cross_as_their_own_class() -> None:
    invalid = errors.InvalidArgument([errors.FieldViolation("a", "bad"), errors.FieldViolation("b.c", "worse")])
    back = protocol.WireError.of(invalid).to_error()
    assert isinstance(back, errors.InvalidArgument)
    assert [(v.field, v.description) for v in back.violations] == [("a", "bad"), ("b.c", "worse")]
    for kind in (errors.DeadlineExceeded, errors.FailedPrecondition, errors.Unavailable, errors.NotFound):
        crossed = protocol.WireError.of(kind("why")).to_error()
        assert type(crossed) is kind and str(crossed) == "why"
    # A name the core does not define (or that is no domain error) is a plain MecbenchError.
    for name in ("NoSuchError", "FieldViolation", "grpc"):
        crossed = protocol.WireError(name, "why").to_error()
        assert type(crossed) is errors.MecbenchError and str(crossed) == "why"


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        ("bytes", "a frame that is not a message"),
        ("dict", "a frame of dict, not (version, message)"),
        ("version", f"protocol version {protocol.PROTOCOL_VERSION + 1}, this end speaks {protocol.PROTOCOL_VERSION}"),
        ("field", "a SessionReady with sample_count of type str"),
        ("command", "a CancelTest where an event was expected"),
        ("foreign", "a frame names posix.system, not a message of this protocol"),
        ("oversize", f"message of {protocol.MAX_MESSAGE_BYTES + 1} bytes is over the limit"),
    ],
)
def test_a_frame_that_is_no_event_is_a_protocol_error(tmp_path: Path, frame: str, problem: str) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(protocol.ProtocolError) as raised:
        protocol.read_event(io.BytesIO(fake_worker.BAD_FRAMES[frame](str(marker))))
    assert problem in str(raised.value)
    assert isinstance(raised.value, protocol.ProtocolVersionError) == (frame == "version")
    assert not marker.exists()


def test_the_foreign_frame_would_run_its_command_if_unpickled_naively(tmp_path: Path) -> None:
    """The check above means something: a plain unpickler runs the frame's command."""
    marker = tmp_path / "marker"
    pickle.loads(fake_worker.BAD_FRAMES["foreign"](str(marker))[4:])
    assert marker.exists()


def test_wrong_types_inside_nested_and_container_fields_are_refused() -> None:
    bad: list[object] = [
        protocol.OpenFailed(protocol.WireError("Unavailable", "x", (("field", 3),))),  # type: ignore[arg-type]
        protocol.OpenFailed("Unavailable: x"),  # type: ignore[arg-type]
        protocol.TestFinished("t", ran=1),  # type: ignore[arg-type]
        protocol.TestFinished("t", ran=True, issued=True),
        protocol.TestFinished("t", ran=True, llm_metrics=[("x", 1.0)]),  # type: ignore[arg-type]
        protocol.TestFinished("t", ran=True, failed_samples_by_kind=(("x", 1.5),)),  # type: ignore[arg-type]
        protocol.TestProgress("t", None, 1, 1),  # type: ignore[arg-type]
    ]
    for message in bad:
        payload = pickle.dumps((protocol.PROTOCOL_VERSION, message))
        with pytest.raises(protocol.ProtocolError, match=f"a {type(message).__name__} with "):
            protocol.read_event(io.BytesIO(struct.pack(">I", len(payload)) + payload))
    # Ints where floats belong are floats enough; None where the field allows it.
    good = protocol.TestFinished("t", ran=True, wall_s=2, issued=None)
    payload = pickle.dumps((protocol.PROTOCOL_VERSION, good))
    assert protocol.read_event(io.BytesIO(struct.pack(">I", len(payload)) + payload)) == good


def test_a_stream_cut_inside_a_message_is_a_protocol_error() -> None:
    whole = io.BytesIO()
    protocol.EventWriter(whole).send(protocol.SessionReady(0.1, 1, 1))
    for cut in (2, 10, len(whole.getvalue()) - 1):
        with pytest.raises(protocol.ProtocolError, match="stream ended inside a message"):
            protocol.read_event(io.BytesIO(whole.getvalue()[:cut]))
