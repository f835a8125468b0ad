"""Agents killed with SIGKILL in the middle of a run: the run fails within seconds with a reason
that names the component, nothing it started is left running, and the next run works once the
agent is back (the controller starts a fresh one for the same SUT or LoadGen id)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2
from tests.controller.conftest import Stack, short_settings, start_stack, stop_stack, synthetic_sut
from tests.numbers import report

pytestmark = pytest.mark.slow

FAULTS: list[str] = []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("controller"))
    yield running
    stop_stack(running)
    report("faults", f"{len(FAULTS)} injected: {', '.join(FAULTS)}")


def long_run(stack: Stack, sut_id: str) -> str:
    settings = short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(20))
    spec = controller_pb2.RunSpec(experiment_id="faults", sut_id=sut_id, settings=settings)
    run_id: str = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id
    deadline = time.monotonic() + 30
    while stack.app.runs.get_run(run_id).state != common_pb2.RUN_STATE_RUNNING:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the test
    return run_id


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead; its parent has not reaped it yet.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def short_run_succeeds(stack: Stack, sut_id: str) -> None:
    spec = controller_pb2.RunSpec(experiment_id="faults", sut_id=sut_id,
                                  settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM))
    final = stack.wait(stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id, 60)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error


def test_a_killed_sut_agent_fails_the_run_naming_it_and_a_new_one_serves_the_next(stack: Stack) -> None:
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="victim", config=synthetic_sut(0.001)))
    pid = stack.app.pool.get_sut("victim").agent.pid
    run_id = long_run(stack, "victim")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    FAULTS.append("SUT agent SIGKILL")
    final = stack.wait(run_id, 30)
    took = time.monotonic() - killed
    report("faults", f"SUT agent killed: run {common_pb2.RunState.Name(final.state)} after {took:.1f}s: "
                     f"{final.error}")
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "SUT agent" in final.error
    assert took < 15
    # Deploying the same SUT again starts a fresh agent, and runs work.
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="victim", config=synthetic_sut(0.001)))
    assert stack.app.pool.get_sut("victim").agent.pid != pid
    short_run_succeeds(stack, "victim")


def test_a_killed_loadgen_agent_fails_the_run_naming_it_and_the_next_run_gets_a_new_one(stack: Stack) -> None:
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="steady", config=synthetic_sut(0.001)))
    short_run_succeeds(stack, "steady")  # the shared LoadGen agent exists now
    loadgen = stack.app.pool.loadgen_for_client(0)
    pid = loadgen.agent.pid
    sessions_before = {p for p in _children(pid)}
    run_id = long_run(stack, "steady")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    FAULTS.append("LoadGen agent SIGKILL")
    final = stack.wait(run_id, 30)
    took = time.monotonic() - killed
    report("faults", f"LoadGen agent killed: run {common_pb2.RunState.Name(final.state)} after {took:.1f}s: "
                     f"{final.error}")
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "LoadGen agent" in final.error
    assert took < 15
    # Its LoadGen session processes notice their parent is gone and exit.
    deadline = time.monotonic() + 15
    while any(alive(p) for p in sessions_before):
        assert time.monotonic() < deadline, "LoadGen session processes outlived their agent"
        time.sleep(0.1)
    short_run_succeeds(stack, "steady")
    assert stack.app.pool.loadgen_for_client(0).agent.pid != pid


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def test_a_stuck_sut_ends_the_test_with_a_clear_timeout(stack: Stack) -> None:
    """A SUT agent frozen mid-run (SIGSTOP: its sockets stay open, nothing answers) must not hang
    LoadGen: the data plane's response timeout ends the test and says why."""
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="frozen", config=synthetic_sut(0.001)))
    pid = stack.app.pool.get_sut("frozen").agent.pid
    settings = short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(20))
    spec = controller_pb2.RunSpec(
        experiment_id="faults", sut_id="frozen", settings=settings,
        data_plane=loadgen_agent_pb2.DataPlaneOptions(response_timeout=durations.from_seconds(2)),
    )
    run_id = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id
    deadline = time.monotonic() + 30
    while stack.app.runs.get_run(run_id).progress.samples_completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGSTOP)
    FAULTS.append("SUT agent SIGSTOP")
    stopped_at = time.monotonic()
    try:
        final = stack.wait(run_id, 60)
    finally:
        os.kill(pid, signal.SIGCONT)
    took = time.monotonic() - stopped_at
    report("faults", f"SUT agent frozen: run {common_pb2.RunState.Name(final.state)} after {took:.1f}s: "
                     f"{final.error}")
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "no response" in final.error.lower() or "deadline" in final.error.lower()
    assert took < 20
    short_run_succeeds(stack, "frozen")  # thawed, it serves again


def test_cancelling_an_experiment_while_its_point_deploys_stops_it_at_once(stack: Stack) -> None:
    """A cancel that lands while the point's run is still setting up (no LoadGen test running yet
    to cancel) must still stop the test that is about to start."""
    spec = controller_pb2.ExperimentSpec(
        experiment_id="cancel-early", sut=synthetic_sut(0.001), skip_calibration=True,
        settings=short_settings(common_pb2.SCENARIO_SERVER, min_duration=durations.from_seconds(20)),
    )
    stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec))
    deadline = time.monotonic() + 30
    while not stack.app.experiments.get("cancel-early").run_ids:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled_at = time.monotonic()
    stack.stub.CancelExperiment(controller_pb2.CancelExperimentRequest(experiment_id="cancel-early"))
    final = stack.app.experiments.wait("cancel-early", 40)
    took = time.monotonic() - cancelled_at
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert took < 10, f"the point ran on for {took:.1f}s after the cancel"
