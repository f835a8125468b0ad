"""Sessions: each a LoadGen process (worker.py) the agent talks to over a pipe.

Plain Python under the gRPC servicer. `SessionManager` opens, runs tests on, cancels, lists and
closes sessions; every error is a `mecbench.core.errors` exception.

Lifecycle of a session: OPENING (process started, loading the dataset and connecting) -> IDLE
<-> RUNNING (one test at a time) -> CLOSED; FAILED when its process dies unexpectedly or breaks the
pipe's protocol (protocol.py; it is killed then): RunTest on it fails, CloseSession clears it.

Cancelling a test: LoadGen has no abort API. The worker answers every outstanding query at once
and every later one as it is issued, which ends Offline and query-count-bound tests at once; a
test bound by min_duration (Server's schedule, SingleStream's duration) would keep LoadGen busy
until its end, so if LoadGen has not returned `cancel_grace_s` after the cancel the agent kills
the session's process and starts a fresh one for the same session (OPENING, then IDLE again;
`pid` changes and `worker_restarts` counts it). Either way the test ends with
TestFinished(cancelled=True). A data-plane abort (no response for `response_timeout`, a broken
stream) takes the same path and ends RunTest with the error instead.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from loadgen_agent import protocol
from loadgen_agent.datasets import ROOTS_SETTING, uri_problem
from loadgen_agent.protocol import CommandWriter, ProtocolError, ProtocolVersionError, read_event
from loadgen_agent.results import apply_integrity, iter_file_chunks, parse_result_dir
from loadgen_agent.settings import LoadGenAgentSettings
from loadgen_agent.settings_builder import validate_settings
from loadgen_agent.worker import DEFAULT_SAMPLE_COUNT, synthetic_sample_bytes
from mecbench.core import durations
from mecbench.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MecbenchError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violations,
)
from mecbench.core.framing import ADDED_WAIT_FIELDS, ADDED_WAIT_RULE, added_wait_allowed
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, loadgen_agent_pb2
from store.local_files import resolve_allowed
from store.uris import is_s3

log = get_logger("mecbench.loadgen.sessions")

_TEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_MAX_SAMPLE_COUNT = 10_000_000
# Closed sessions remembered so a second CloseSession is not an error.
_CLOSED_KEPT = 256

State = loadgen_agent_pb2.SessionState

# The session process's command line; SessionManager(worker_command=...) runs another program that
# speaks protocol.py (tests/loadgen_agent/fake_worker.py: the session manager without LoadGen).
WORKER_COMMAND: Final[tuple[str, ...]] = (sys.executable, "-m", "loadgen_agent.worker")


def validate_open_request(
    request: loadgen_agent_pb2.OpenSessionRequest, max_dataset_bytes: int, dataset_roots: Sequence[Path] = ()
) -> None:
    """Raise InvalidArgument with every problem of an OpenSessionRequest. A local dataset path
    must lie under the operator's `dataset_roots` (checked again when it is read)."""
    v = Violations()
    match = _HOST_PORT.match(request.sut_address)
    if not match:
        v.add("sut_address", "must be HOST:PORT")
    elif not 0 < int(match.group(1)) < 65536:
        v.add("sut_address", "port must be in 1..65535")
    dataset = request.dataset
    source = dataset.WhichOneof("source")
    if source == "uri":
        problem = uri_problem(dataset.uri)
        if problem is not None:
            v.add("dataset.uri", problem)
        elif not is_s3(dataset.uri):
            try:
                resolve_allowed(dataset.uri, dataset_roots, field="dataset.uri", setting=ROOTS_SETTING)
            except InvalidArgument as exc:
                v.extend(exc.violations)
    else:
        synthetic = dataset.synthetic
        v.check(synthetic.sample_count <= _MAX_SAMPLE_COUNT, "dataset.synthetic.sample_count", "at most 10,000,000")
        for i, dim in enumerate(synthetic.shape):
            v.check(dim > 0, f"dataset.synthetic.shape[{i}]", "dimensions must be positive")
        if synthetic.data_type not in common_pb2.DataType.values():
            v.add("dataset.synthetic.data_type", "unknown data type")
        elif all(d > 0 for d in synthetic.shape) and synthetic.sample_count <= _MAX_SAMPLE_COUNT:
            total = (synthetic.sample_count or DEFAULT_SAMPLE_COUNT) * synthetic_sample_bytes(synthetic)
            v.check(
                total <= max_dataset_bytes,
                "dataset.synthetic",
                f"{total} bytes is over the agent's limit of {max_dataset_bytes}",
            )
    if dataset.sha256:
        v.check(bool(re.fullmatch(r"[0-9a-fA-F]{64}", dataset.sha256)), "dataset.sha256", "must be 64 hex digits")
    options = request.data_plane
    if options.sut_interface not in loadgen_agent_pb2.SutInterface.values():
        v.add("data_plane.sut_interface", "unknown SUT interface")
    v.check(options.streams <= 64, "data_plane.streams", "at most 64")
    v.check(options.max_batch_size <= 65536, "data_plane.max_batch_size", "at most 65536")
    for name in ("max_batch_delay", "response_timeout"):
        v.check(not durations.is_negative(getattr(options, name)), f"data_plane.{name}", "must not be negative")
    for name in ADDED_WAIT_FIELDS:
        v.check(added_wait_allowed(getattr(options, name)), f"data_plane.{name}", ADDED_WAIT_RULE)
    v.raise_if_any()


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class WorkerProcess:
    """A session process: `python -m loadgen_agent.worker` (or `command`) in its own process group,
    commands on its stdin, events on its stdout, its stderr (JSON logs) shared with the agent's.
    A process that breaks the protocol (a frame that is no event, another protocol version) is
    killed at once and its session fails saying so."""

    def __init__(
        self,
        on_event: Callable[[protocol.Event], None],
        on_exit: Callable[[str], None],
        command: Sequence[str] = WORKER_COMMAND,
    ) -> None:
        self._on_event = on_event
        self._on_exit = on_exit
        self._command = list(command)
        self._writer: CommandWriter | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def start(self, open_command: protocol.OpenSession) -> None:
        self.process = subprocess.Popen(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            start_new_session=True,  # its own process group: killpg takes anything it started
            close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdin is not None
        self._writer = CommandWriter(self.process.stdin)
        self._writer.send(open_command)
        threading.Thread(target=self._read_events, name=f"worker-{self.process.pid}", daemon=True).start()

    def send(self, command: protocol.Command) -> bool:
        """False when the process is gone."""
        if self._writer is None:
            return False
        try:
            self._writer.send(command)
        except (BrokenPipeError, ValueError, OSError):
            return False
        return True

    def _read_events(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        broken = ""
        try:
            while True:
                event = read_event(process.stdout)
                if event is None:
                    break
                self._on_event(event)
        except ProtocolVersionError as exc:
            broken = f"speaks another protocol ({exc})"
        except ProtocolError as exc:
            broken = f"broke the protocol: {exc}"
        except Exception:
            log.exception("worker_event_stream_failed", pid=process.pid)
        if broken:
            # Nothing it says can be trusted any more, and it may not be about to exit.
            log.error("worker_protocol_error", pid=process.pid, error=broken)
            self.kill()
        try:
            returncode: int | None = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            returncode = None
        with contextlib.suppress(OSError):
            process.stdout.close()
        self._on_exit(broken or _describe_exit(returncode))

    def kill(self) -> None:
        """SIGKILL the process group, then reap the process."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()

    def stop(self, grace_s: float = 1.0) -> None:
        """Ask the process to exit, then make sure of it (its whole process group)."""
        process = self.process
        if process is None:
            return
        self.send(protocol.CloseSession())
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
        self.kill()


@dataclass(frozen=True, slots=True)
class CountedProgress:
    """A TestProgress with the live QPS the agent computed when it arrived."""

    progress: protocol.TestProgress
    live_qps: float


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """The session's process ended (or broke the protocol) during the test."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """CloseSession ended the session during the test."""


# What RunTest's stream reads from a test's queue.
TestEvent = protocol.TestStarted | CountedProgress | protocol.TestFinished | WorkerDied | SessionClosed


@dataclass
class ActiveTest:
    test_id: str
    settings: common_pb2.LoadGenSettings
    arrival: float
    outdir: Path
    events: queue.SimpleQueue[TestEvent] = field(default_factory=queue.SimpleQueue)
    finished: bool = False
    cancel_requested: bool = False
    abort_error: MecbenchError | None = None
    grace_timer: threading.Timer | None = None
    # The previous progress event's time and completed count (live QPS is the rate between two).
    progress_time: float = 0.0
    progress_completed: int = 0


@dataclass(frozen=True)
class SessionProgress:
    """What the agent's /metrics reports of one session."""

    session_id: str
    owner: str
    state: loadgen_agent_pb2.SessionState.ValueType
    live_qps: float
    samples_completed: int


class LoadGenSession:
    """One session: its process, its state and its current test."""

    def __init__(
        self,
        session_id: str,
        request: loadgen_agent_pb2.OpenSessionRequest,
        settings: LoadGenAgentSettings,
        directory: Path,
        worker_command: Sequence[str] = WORKER_COMMAND,
    ) -> None:
        self.session_id = session_id
        self.request = request
        self.settings = settings
        self.directory = directory
        self.state: loadgen_agent_pb2.SessionState.ValueType = State.SESSION_STATE_OPENING
        self.opened_at = Timestamp()
        self.opened_at.GetCurrentTime()
        self.setup_time_s = 0.0
        self.sample_count = 0
        self.tests_run = 0
        self.worker_restarts = 0
        # Samples completed over every test of the session, and the current test's live QPS.
        self.samples_completed = 0
        self.live_qps = 0.0
        self.error = ""
        self.pid = 0
        self.test: ActiveTest | None = None
        self._cond = threading.Condition()
        self._generation = 0
        self._worker: WorkerProcess | None = None
        self._worker_command = worker_command
        self._open_error: MecbenchError | None = None
        self._fatal = ""
        self._test_counter = 0

    # --- the process ---------------------------------------------------------------------------

    def _open_command(self) -> protocol.OpenSession:
        return protocol.OpenSession(
            session_id=self.session_id,
            sut_address=self.request.sut_address,
            dataset=self.request.dataset.SerializeToString(),
            data_plane=self.request.data_plane.SerializeToString(),
            progress_interval_s=self.settings.progress_interval_s,
            sut_connect_timeout_s=self.settings.sut_connect_timeout_s,
            log_level=self.settings.worker_log_level,
            session_dir=str(self.directory),
            dataset_cache_dir=str(self.settings.dataset_cache_dir),
            max_dataset_bytes=self.settings.max_dataset_bytes,
            dataset_roots=tuple(str(root) for root in self.settings.dataset_roots),
        )

    def start_worker(self) -> None:
        """Start a process for this session (state OPENING until it reports ready)."""
        with self._cond:
            self._generation += 1
            generation = self._generation
            self.state = State.SESSION_STATE_OPENING
            self.pid = 0
            self._open_error = None
            self._fatal = ""
            worker = WorkerProcess(
                on_event=lambda event: self._on_event(generation, event),
                on_exit=lambda description: self._on_exit(generation, description),
                command=self._worker_command,
            )
            self._worker = worker
        worker.start(self._open_command())
        with self._cond:
            if self._generation == generation:
                self.pid = worker.pid

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the process reports ready; raise its error (or a timeout) otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.state == State.SESSION_STATE_OPENING:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"the session process did not load its dataset and connect to {self.request.sut_address} "
                        f"within {timeout_s:g}s"
                    )
                self._cond.wait(remaining)
            if self._open_error is not None:
                raise self._open_error
            if self.state == State.SESSION_STATE_FAILED:
                raise Unavailable(self.error)
            if self.state == State.SESSION_STATE_CLOSED:
                raise FailedPrecondition(f"session {self.session_id} was closed")

    def _on_event(self, generation: int, event: protocol.Event) -> None:
        with self._cond:
            if generation != self._generation or self.state == State.SESSION_STATE_CLOSED:
                return
            if isinstance(event, protocol.SessionReady):
                if self.state == State.SESSION_STATE_OPENING:  # a second one changes nothing
                    self.state = State.SESSION_STATE_IDLE
                    self.setup_time_s = event.setup_time_s
                    self.sample_count = event.sample_count
                    self._cond.notify_all()
                return
            if isinstance(event, protocol.OpenFailed):
                self._open_error = event.error.to_error()
                self.error = str(self._open_error)
                self.state = State.SESSION_STATE_FAILED
                self._cond.notify_all()
                return
            if isinstance(event, protocol.WorkerFatal):
                self._fatal = event.error
                log.error("session_process_error", session_id=self.session_id, traceback=event.traceback)
                return
            test = self.test
            if test is None or event.test_id != test.test_id or test.finished:
                return
            if isinstance(event, protocol.TestStarted):
                test.progress_time = event.start_time
                test.events.put(event)
            elif isinstance(event, protocol.TestProgress):
                # Counted here, not where RunTest's stream reads it, so a caller that stops
                # reading does not stop the metrics.
                self.live_qps = self._count_progress(test, event.completed, event.time)
                test.events.put(CountedProgress(event, self.live_qps))
            elif isinstance(event, protocol.TestAborting):
                test.abort_error = event.error.to_error()
                self._arm_grace_timer(test)
            else:
                if event.completed is not None:
                    self._count_progress(test, event.completed, None)
                self._finish_test(test)
                test.events.put(event)

    def _count_progress(self, test: ActiveTest, completed: int, now: float | None) -> float:
        """With the lock held: add the samples completed since the previous event to the session's
        total; returns the QPS since then (0 for an event without a time: the test's end)."""
        delta = completed - test.progress_completed
        self.samples_completed += delta
        test.progress_completed = completed
        if now is None:
            return 0.0
        interval = now - test.progress_time
        test.progress_time = now
        return delta / interval if interval > 0 else 0.0

    def _on_exit(self, generation: int, description: str) -> None:
        with self._cond:
            if generation != self._generation or self.state == State.SESSION_STATE_CLOSED:
                return
            reason = f"LoadGen session process (pid {self.pid}) {description}"
            if self._fatal:
                reason += f": {self._fatal}"
            self.error = reason
            self.state = State.SESSION_STATE_FAILED
            self.pid = 0
            test = self.test
            if test is not None and not test.finished:
                self._finish_test(test)
                test.events.put(WorkerDied(reason))
            self._cond.notify_all()
        log.warning("session_failed", session_id=self.session_id, reason=reason)

    # --- tests ---------------------------------------------------------------------------------

    def begin_test(
        self, test_id: str, settings: common_pb2.LoadGenSettings, arrival: float, record_latencies: bool = False
    ) -> ActiveTest:
        deadline = time.monotonic() + self.settings.open_timeout_s
        with self._cond:
            while self.state == State.SESSION_STATE_OPENING and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            if self.state == State.SESSION_STATE_RUNNING:
                current = self.test.test_id if self.test else ""
                raise FailedPrecondition(f"session {self.session_id} is running test {current}; one test at a time")
            if self.state == State.SESSION_STATE_FAILED:
                raise FailedPrecondition(f"session {self.session_id} failed: {self.error}")
            if self.state == State.SESSION_STATE_CLOSED:
                raise FailedPrecondition(f"session {self.session_id} is closed")
            if self.state != State.SESSION_STATE_IDLE:
                raise Unavailable(f"session {self.session_id} is still opening")
            violations = validate_settings(settings, "settings", self.sample_count)
            if violations:
                raise InvalidArgument(violations)
            self._test_counter += 1
            outdir = self.directory / "tests" / f"{self._test_counter:05d}-{test_id}"
            test = ActiveTest(test_id, settings, arrival, outdir)
            worker = self._worker
            assert worker is not None
            command = protocol.RunTest(
                test_id=test_id,
                settings=settings.SerializeToString(),
                outdir=str(outdir),
                conf_dir=str(self.directory / "conf"),
                record_latencies=record_latencies,
            )
            if not worker.send(command):
                raise Unavailable(f"session {self.session_id}: its LoadGen process is gone")
            self.test = test
            self.state = State.SESSION_STATE_RUNNING
            return test

    def _finish_test(self, test: ActiveTest) -> None:
        """With the lock held: the test is over (however it ended)."""
        test.finished = True
        if test.grace_timer is not None:
            test.grace_timer.cancel()
        self.tests_run += 1
        self.live_qps = 0.0
        if self.state == State.SESSION_STATE_RUNNING:
            self.state = State.SESSION_STATE_IDLE
        self._cond.notify_all()

    def cancel(self) -> bool:
        with self._cond:
            test = self.test
            if test is None or test.finished:
                return False
            test.cancel_requested = True
            worker = self._worker
            self._arm_grace_timer(test)
        if worker is not None:
            worker.send(protocol.CancelTest(test.test_id))
        log.info("test_cancel_requested", session_id=self.session_id, test_id=test.test_id)
        return True

    def _arm_grace_timer(self, test: ActiveTest) -> None:
        """With the lock held: replace the process if LoadGen has not ended the test in time."""
        if test.grace_timer is None:
            timer = threading.Timer(self.settings.cancel_grace_s, self._replace_worker, args=(test,))
            timer.daemon = True
            test.grace_timer = timer
            timer.start()

    def _replace_worker(self, test: ActiveTest) -> None:
        with self._cond:
            if test.finished or self.state == State.SESSION_STATE_CLOSED:
                return
            old = self._worker
            self._generation += 1  # events and the exit of the old process are ignored from now on
            self._finish_test(test)
            self.state = State.SESSION_STATE_OPENING
            self.worker_restarts += 1
        log.warning(
            "session_process_replaced",
            session_id=self.session_id,
            test_id=test.test_id,
            reason="cancel" if test.cancel_requested else str(test.abort_error),
        )
        test.events.put(protocol.TestFinished(test.test_id, ran=False, cancelled=test.cancel_requested))
        if old is not None:
            old.kill()
        try:
            self.start_worker()
        except OSError as exc:
            with self._cond:
                self.state = State.SESSION_STATE_FAILED
                self.error = f"could not start a new LoadGen process: {exc}"
                self._cond.notify_all()

    def abandon(self, test_id: str) -> None:
        """The caller of RunTest went away: cancel the test if it still runs."""
        with self._cond:
            running = self.test is not None and self.test.test_id == test_id and not self.test.finished
        if running:
            self.cancel()

    # --- closing and describing --------------------------------------------------------------

    def close(self) -> None:
        with self._cond:
            if self.state == State.SESSION_STATE_CLOSED:
                return
            self.state = State.SESSION_STATE_CLOSED
            self._generation += 1
            worker = self._worker
            self._worker = None
            test = self.test
            if test is not None and not test.finished:
                test.finished = True
                if test.grace_timer is not None:
                    test.grace_timer.cancel()
                test.events.put(SessionClosed())
            self.pid = 0
            self._cond.notify_all()
        if worker is not None:
            worker.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def progress(self) -> SessionProgress:
        with self._cond:
            return SessionProgress(
                self.session_id, self.request.owner, self.state, self.live_qps, self.samples_completed
            )

    def describe(self) -> loadgen_agent_pb2.Session:
        with self._cond:
            session = loadgen_agent_pb2.Session(
                session_id=self.session_id,
                state=self.state,
                sut_address=self.request.sut_address,
                sample_count=self.sample_count,
                label=self.request.label,
                owner=self.request.owner,
                opened_at=self.opened_at,
                setup_time=durations.from_seconds(self.setup_time_s),
                tests_run=self.tests_run,
                current_test_id=self.test.test_id if self.test and not self.test.finished else "",
                pid=self.pid,
                error=self.error,
                worker_restarts=self.worker_restarts,
            )
        return session


class SessionManager:
    """Every session of this agent. `worker_command` is the session process's command line: the
    LoadGen worker, or any program that speaks protocol.py (the tests' fake worker)."""

    def __init__(
        self, settings: LoadGenAgentSettings | None = None, worker_command: Sequence[str] = WORKER_COMMAND
    ) -> None:
        self.settings = settings or LoadGenAgentSettings.load()
        self._worker_command = tuple(worker_command)
        self._sessions: dict[str, LoadGenSession] = {}
        self._lock = threading.Lock()
        root = self.settings.work_dir or Path(tempfile.gettempdir())
        self._root = root
        self._closed = False

    def _get(self, session_id: str) -> LoadGenSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}")
        return session

    def open_session(self, request: loadgen_agent_pb2.OpenSessionRequest) -> loadgen_agent_pb2.Session:
        validate_open_request(request, self.settings.max_dataset_bytes, self.settings.dataset_roots)
        session_id = f"ls-{uuid.uuid4().hex[:12]}"
        with self._lock:
            if self._closed:
                raise Unavailable("the LoadGen agent is stopping")
            live = [
                s
                for s in self._sessions.values()
                if s.state not in (State.SESSION_STATE_CLOSED, State.SESSION_STATE_FAILED)
            ]
            if len(live) >= self.settings.max_sessions:
                raise ResourceExhausted(f"{len(live)} sessions are open, the agent's limit (max_sessions)")
            self._root.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix=f"mecbench-loadgen-{session_id}-", dir=self._root))
            session = LoadGenSession(session_id, request, self.settings, directory, self._worker_command)
            self._sessions[session_id] = session
        try:
            session.start_worker()
            session.wait_ready(self.settings.open_timeout_s)
        except BaseException:
            session.close()
            with self._lock:
                self._sessions.pop(session_id, None)
            raise
        described = session.describe()
        log.info(
            "session_opened",
            session_id=session_id,
            sut=request.sut_address,
            pid=described.pid,
            samples=described.sample_count,
            setup_s=round(session.setup_time_s, 3),
        )
        return described

    def run_test(self, request: loadgen_agent_pb2.RunTestRequest) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
        """Run one test: TestStarted, TestProgress events, log chunks, then TestFinished."""
        return self.start_test(request)[1]

    def start_test(
        self, request: loadgen_agent_pb2.RunTestRequest
    ) -> tuple[str, Iterator[loadgen_agent_pb2.RunTestResponse]]:
        """Check the request and start the test; (test id, its events). Request errors raise here;
        errors of the test itself raise from the iterator."""
        arrival = time.monotonic()
        session = self._get(request.session_id)
        test_id = request.test_id or f"test-{uuid.uuid4().hex[:12]}"
        if not _TEST_ID.match(test_id):
            raise InvalidArgument("letters, digits, '.', '_' and '-', at most 128, starting alphanumeric", "test_id")
        test = session.begin_test(test_id, request.settings, arrival, request.record_sample_latencies)
        return test_id, self._test_events(session, test)

    def _test_events(self, session: LoadGenSession, test: ActiveTest) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
        def event(**kwargs: object) -> loadgen_agent_pb2.RunTestResponse:
            response = loadgen_agent_pb2.RunTestResponse(test_id=test.test_id, **kwargs)  # type: ignore[arg-type]
            response.time.GetCurrentTime()
            return response

        start_time = 0.0
        try:
            while True:
                message = test.events.get()
                if isinstance(message, protocol.TestStarted):
                    start_time = message.start_time
                    yield event(
                        started=loadgen_agent_pb2.TestStarted(
                            setup_time=durations.from_seconds(max(0.0, start_time - test.arrival)),
                            effective_settings=message.effective_settings,
                        )
                    )
                elif isinstance(message, CountedProgress):
                    progress = message.progress
                    yield event(
                        progress=loadgen_agent_pb2.TestProgress(
                            elapsed=durations.from_seconds(max(0.0, progress.time - start_time)),
                            samples_issued=progress.issued,
                            samples_completed=progress.completed,
                            # Computed when the event arrived (LoadGenSession._count_progress).
                            live_qps=message.live_qps,
                        )
                    )
                elif isinstance(message, protocol.TestFinished):
                    yield from self._finished(test, message, event)
                    return
                elif isinstance(message, WorkerDied):
                    raise Unavailable(f"test {test.test_id} failed: {message.reason}")
                else:
                    raise Cancelled(f"session {session.session_id} was closed during test {test.test_id}")
        finally:
            session.abandon(test.test_id)
            shutil.rmtree(test.outdir, ignore_errors=True)

    def _finished(
        self,
        test: ActiveTest,
        message: protocol.TestFinished,
        event: Callable[..., loadgen_agent_pb2.RunTestResponse],
    ) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
        if message.error is not None:
            raise message.error.to_error()
        if test.abort_error is not None and not message.cancelled:
            raise test.abort_error
        finished = loadgen_agent_pb2.TestFinished(
            cancelled=message.cancelled,
            wall_time=durations.from_seconds(message.wall_s),
            batches_sent=message.batches_sent,
            samples_sent=message.samples_sent,
            sample_errors=message.sample_errors,
            first_sample_error=message.first_sample_error,
        )
        if finished.batches_sent:
            finished.mean_batch_size = finished.samples_sent / finished.batches_sent
        if test.outdir.is_dir():
            finished.result.CopyFrom(parse_result_dir(test.outdir, test.settings.scenario, test.settings.mode))
            apply_integrity(finished.result, dict(message.failed_samples_by_kind), list(message.sample_error_messages))
            finished.result.llm_metrics.update(dict(message.llm_metrics))
            finished.result.issue_slack.CopyFrom(durations.from_ns(message.issue_slack_ns))
            for chunk in iter_file_chunks(test.outdir, self.settings.log_chunk_bytes):
                yield event(log_chunk=chunk)
        yield event(finished=finished)

    def cancel_test(self, session_id: str) -> bool:
        return self._get(session_id).cancel()

    def abandon_test(self, session_id: str, test_id: str) -> None:
        """RunTest ended on the caller's side (cancelled, deadline, disconnect): cancel that test if
        it is still the one running."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.abandon(test_id)

    def close_session(self, session_id: str) -> None:
        session = self._get(session_id)
        session.close()
        with self._lock:
            closed = [sid for sid, s in self._sessions.items() if s.state == State.SESSION_STATE_CLOSED]
            for sid in closed[: max(0, len(closed) - _CLOSED_KEPT)]:
                del self._sessions[sid]
        log.info("session_closed", session_id=session_id)

    def list_sessions(self) -> list[loadgen_agent_pb2.Session]:
        with self._lock:
            sessions = list(self._sessions.values())
        return [s.describe() for s in sessions if s.state != State.SESSION_STATE_CLOSED]

    def progress(self) -> list[SessionProgress]:
        """Every session not closed, for the agent's /metrics."""
        with self._lock:
            sessions = list(self._sessions.values())
        found = [s.progress() for s in sessions]
        return [p for p in found if p.state != State.SESSION_STATE_CLOSED]

    def get_session(self, session_id: str) -> loadgen_agent_pb2.Session:
        return self._get(session_id).describe()

    def close(self) -> None:
        """Close every session (the agent is stopping): no session process outlives the agent."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close()
