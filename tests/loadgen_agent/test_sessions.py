"""The session manager (loadgen_agent/sessions.py) driven through the fake worker
(fake_worker.py, real processes on the real pipes, no LoadGen): what it does with every way a
session process can behave, each in a fraction of a second. LoadGen itself: test_agent.py."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadgen_agent.results import parse_result
from loadgen_agent.sessions import SessionManager
from mecbench.core.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from mecbench.v1 import common_pb2, loadgen_agent_pb2
from tests.loadgen_agent import fake_worker
from tests.loadgen_agent.conftest import Outcome, agent_settings, collect, process_exists, short_settings

FAKE_WORKER = Path(fake_worker.__file__)
SUMMARY = Path(__file__).parent / "fixtures" / "offline.summary.txt"
GRACE_S = 0.3
State = loadgen_agent_pb2.SessionState


class Fakes:
    """Session managers whose session processes are fake workers following one script."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pid_file = tmp_path / "pids"
        self.marker = tmp_path / "marker"
        self.work_dir = tmp_path / "work"
        self.managers: list[SessionManager] = []

    def manager(self, open: str = "ready", tests: tuple[str, ...] = ("ok",), **settings: object) -> SessionManager:
        script = {
            "open": open,
            "tests": list(tests),
            "pids": str(self.pid_file),
            "counter": str(self.tmp_path / "runs"),
            "summary": str(SUMMARY),
            "marker": str(self.marker),
        }
        overrides: dict[str, object] = {"cancel_grace_s": GRACE_S, "open_timeout_s": 10.0} | settings
        manager = SessionManager(
            agent_settings(self.work_dir, **overrides),
            worker_command=(sys.executable, str(FAKE_WORKER), json.dumps(script)),
        )
        self.managers.append(manager)
        return manager

    def pids(self) -> list[int]:
        return [int(line) for line in self.pid_file.read_text().split()] if self.pid_file.is_file() else []

    def assert_nothing_left(self) -> None:
        """No fake process alive, no session directory left."""
        for manager in self.managers:
            manager.close()
        assert self.pids(), "no fake worker ever started"
        assert not [pid for pid in self.pids() if process_exists(pid)]
        assert not list(self.work_dir.glob("mecbench-loadgen-*"))


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Fakes]:
    fakes = Fakes(tmp_path)
    yield fakes
    fakes.assert_nothing_left()


def open_request() -> loadgen_agent_pb2.OpenSessionRequest:
    # Checked like any request; the fake loads nothing and connects nowhere.
    return loadgen_agent_pb2.OpenSessionRequest(sut_address="127.0.0.1:9", label="client-0", owner="run-1")


def start(
    manager: SessionManager, session_id: str, test_id: str = ""
) -> tuple[str, Iterator[loadgen_agent_pb2.RunTestResponse]]:
    request = loadgen_agent_pb2.RunTestRequest(
        session_id=session_id, test_id=test_id, settings=short_settings(common_pb2.SCENARIO_OFFLINE)
    )
    return manager.start_test(request)


def run(manager: SessionManager, session_id: str) -> Outcome:
    return collect(start(manager, session_id)[1])


def first_event(events: Iterator[loadgen_agent_pb2.RunTestResponse], kind: str) -> None:
    for event in events:
        if event.WhichOneof("event") == kind:
            return
    raise AssertionError(f"no {kind} event")


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


# --- open, run, progress, results ----------------------------------------------------------------


def test_open_run_progress_and_result(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("ok",))
    session = manager.open_session(open_request())
    assert session.state == State.SESSION_STATE_IDLE and session.sample_count == 64
    assert session.pid == fakes.pids()[0] and process_exists(session.pid)
    assert session.setup_time.ToNanoseconds() == 10_000_000 and session.owner == "run-1"

    outcome = run(manager, session.session_id)
    assert outcome.started is not None and outcome.started.effective_settings == "scripted settings"
    step = fake_worker.OK_STEP
    assert [p.samples_completed for p in outcome.progress] == [step, 2 * step, 3 * step]
    assert all(p.live_qps > 0 for p in outcome.progress)
    finished = outcome.finished
    assert finished is not None and not finished.cancelled
    assert finished.batches_sent == fake_worker.OK_PROGRESS and finished.mean_batch_size == step
    # The result is LoadGen's summary as the worker left it, its files streamed back.
    assert outcome.files["mlperf_log_summary.txt"] == SUMMARY.read_bytes()
    expected = parse_result(SUMMARY.read_text(), "", common_pb2.SCENARIO_OFFLINE)
    assert finished.result.samples_per_second == expected.samples_per_second > 0
    assert finished.result.valid == expected.valid and finished.result.latency == expected.latency
    assert finished.result.llm_metrics == {"scripted_metric": 1.5}

    described = manager.get_session(session.session_id)
    assert described.state == State.SESSION_STATE_IDLE and described.tests_run == 1
    assert [p.samples_completed for p in manager.progress()] == [3 * step]
    # The next test runs in the same process.
    assert run(manager, session.session_id).finished is not None
    assert manager.get_session(session.session_id).pid == session.pid and len(fakes.pids()) == 1
    assert [p.samples_completed for p in manager.progress()] == [6 * step]


def test_a_failed_open_is_the_workers_own_error(fakes: Fakes) -> None:
    manager = fakes.manager(open="fail")
    with pytest.raises(InvalidArgument) as raised:
        manager.open_session(open_request())
    assert [(v.field, v.description) for v in raised.value.violations] == [("dataset.uri", "scripted: no such object")]
    assert manager.list_sessions() == []


def test_a_worker_error_before_the_test_fails_the_test_not_the_session(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("error", "ok"))
    session = manager.open_session(open_request())
    with pytest.raises(FailedPrecondition, match="scripted: the SUT agent serves no external server"):
        run(manager, session.session_id)
    assert run(manager, session.session_id).finished is not None


# --- cancelling ----------------------------------------------------------------------------------


def test_a_cancel_racing_the_start_ends_the_test_and_keeps_the_process(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("until_cancel", "until_cancel", "ok"))
    session = manager.open_session(open_request())
    # Cancelled before the worker has said anything of the test.
    _, events = start(manager, session.session_id)
    assert manager.cancel_test(session.session_id)
    cancelled = collect(events)
    assert cancelled.finished is not None and cancelled.finished.cancelled
    # Cancelled while it runs.
    _, events = start(manager, session.session_id)
    first_event(events, "progress")
    assert manager.cancel_test(session.session_id)
    assert collect(events).finished.cancelled  # type: ignore[union-attr]
    assert not manager.cancel_test(session.session_id)  # nothing runs
    described = manager.get_session(session.session_id)
    assert described.worker_restarts == 0 and described.pid == session.pid
    assert run(manager, session.session_id).finished is not None


def test_a_cancel_after_the_end_changes_nothing(fakes: Fakes) -> None:
    grace_s = 0.6  # well over the worker's late answer (fake_worker.LATE_CANCEL_S), on a loaded machine too
    manager = fakes.manager(tests=("late_cancel",), cancel_grace_s=grace_s)
    session = manager.open_session(open_request())
    test_id, events = start(manager, session.session_id, "late")
    first_event(events, "started")
    assert manager.cancel_test(session.session_id)
    # The worker answers the cancel late, but within the grace: nothing is replaced, even after it.
    assert collect(events).finished.cancelled  # type: ignore[union-attr]
    assert not manager.cancel_test(session.session_id)
    manager.abandon_test(session.session_id, test_id)
    time.sleep(grace_s + 0.1)  # past the grace timer's deadline
    described = manager.get_session(session.session_id)
    assert described.state == State.SESSION_STATE_IDLE
    assert described.worker_restarts == 0 and described.pid == session.pid and len(fakes.pids()) == 1


def test_a_caller_that_stops_reading_cancels_its_test(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("until_cancel", "ok"))
    session = manager.open_session(open_request())
    _, events = start(manager, session.session_id)
    first_event(events, "progress")
    events.close()  # type: ignore[attr-defined]
    until(lambda: manager.get_session(session.session_id).state == State.SESSION_STATE_IDLE)
    assert manager.get_session(session.session_id).worker_restarts == 0
    assert run(manager, session.session_id).finished is not None


# --- faults --------------------------------------------------------------------------------------


def test_a_hung_worker_is_replaced_after_the_cancel_grace(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("hang", "ok"))
    session = manager.open_session(open_request())
    _, events = start(manager, session.session_id)
    first_event(events, "started")
    assert manager.cancel_test(session.session_id)
    finished = collect(events).finished
    assert finished is not None and finished.cancelled
    until(lambda: manager.get_session(session.session_id).state == State.SESSION_STATE_IDLE)
    described = manager.get_session(session.session_id)
    assert described.worker_restarts == 1 and described.pid != session.pid
    assert fakes.pids() == [session.pid, described.pid]
    assert not process_exists(session.pid)
    assert run(manager, session.session_id).finished is not None  # on the new process


def test_an_abort_the_worker_cannot_finish_fails_the_test_with_its_error(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("abort_hang", "abort", "ok"))
    session = manager.open_session(open_request())
    # The data plane gave up and LoadGen does not return: replaced after the grace.
    with pytest.raises(DeadlineExceeded, match="scripted: no response"):
        run(manager, session.session_id)
    until(lambda: manager.get_session(session.session_id).state == State.SESSION_STATE_IDLE)
    assert manager.get_session(session.session_id).worker_restarts == 1
    assert not process_exists(session.pid)
    # LoadGen returns after the abort: the same error, the process kept.
    with pytest.raises(DeadlineExceeded, match="scripted: no response"):
        run(manager, session.session_id)
    assert manager.get_session(session.session_id).worker_restarts == 1
    assert run(manager, session.session_id).finished is not None


def test_a_worker_that_crashes_mid_test_fails_the_session(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("crash",))
    session = manager.open_session(open_request())
    with pytest.raises(Unavailable, match=rf"process \(pid {session.pid}\) exited with code 7"):
        run(manager, session.session_id)
    assert not list(fakes.work_dir.glob("mecbench-loadgen-*/tests/*"))  # what LoadGen left is cleared
    described = manager.get_session(session.session_id)
    assert described.state == State.SESSION_STATE_FAILED and "exited with code 7" in described.error
    assert described.pid == 0 and not process_exists(session.pid)
    assert [p.samples_completed for p in manager.progress()] == [5]  # what it reported before
    with pytest.raises(FailedPrecondition, match="failed: LoadGen session process"):
        run(manager, session.session_id)
    manager.close_session(session.session_id)
    assert manager.list_sessions() == []


def test_a_worker_that_never_opens_times_out(fakes: Fakes) -> None:
    manager = fakes.manager(open="hang", open_timeout_s=0.3)
    with pytest.raises(DeadlineExceeded, match="did not load its dataset and connect"):
        manager.open_session(open_request())
    assert manager.list_sessions() == [] and not process_exists(fakes.pids()[0])


def test_a_fatal_error_is_reported_with_the_exit(fakes: Fakes) -> None:
    manager = fakes.manager(open="fatal")
    with pytest.raises(Unavailable, match=r"exited with code 1: RuntimeError: scripted failure"):
        manager.open_session(open_request())


def test_closing_a_session_during_a_test_ends_the_test(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("hang",))
    session = manager.open_session(open_request())
    _, events = start(manager, session.session_id)
    first_event(events, "started")
    closer = threading.Thread(target=manager.close_session, args=(session.session_id,))
    closer.start()
    with pytest.raises(Cancelled, match="was closed during test"):
        collect(events)
    closer.join()
    assert not process_exists(session.pid)


# --- the protocol broken -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("bytes", "broke the protocol: a frame that is not a message"),
        ("version", f"speaks another protocol (protocol version {fake_worker.protocol.PROTOCOL_VERSION + 1}"),
        ("foreign", "broke the protocol: a frame names posix.system"),
    ],
)
def test_a_worker_that_breaks_the_protocol_at_open_is_killed(fakes: Fakes, frame: str, reason: str) -> None:
    manager = fakes.manager(open=frame)
    with pytest.raises(Unavailable) as raised:
        manager.open_session(open_request())
    assert reason in str(raised.value)
    assert not process_exists(fakes.pids()[0])  # killed, though it would have hung
    assert not fakes.marker.exists()  # the frame's command never ran


def test_a_worker_that_breaks_the_protocol_mid_test_fails_the_session(fakes: Fakes) -> None:
    manager = fakes.manager(tests=("dict",))
    session = manager.open_session(open_request())
    with pytest.raises(Unavailable, match="broke the protocol: a frame of dict, not"):
        run(manager, session.session_id)
    described = manager.get_session(session.session_id)
    assert described.state == State.SESSION_STATE_FAILED and not process_exists(session.pid)
