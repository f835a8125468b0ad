"""The controller's run state machine on fake agents (tests/controller/fakes.py): progress, cancel
races, agent deaths and the peak search, in milliseconds, through the controller's real code."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.app import ControllerApp
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2
from tests.controller.conftest import short_settings, synthetic_sut
from tests.controller.fakes import FakeBackend, Script


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def app(tmp_path: Path, script: Script) -> Iterator[ControllerApp]:
    settings = ControllerSettings.load(data_dir=tmp_path, telemetry_interval_s=0)
    controller = ControllerApp(settings, backend=FakeBackend(script))
    try:
        yield controller
    finally:
        controller.close()


def backend(app: ControllerApp) -> FakeBackend:
    fake = app.pool.backend
    assert isinstance(fake, FakeBackend)
    return fake


def server_run(clients: int = 1, qps: float = 200.0, repeats: int = 1) -> controller_pb2.RunSpec:
    return controller_pb2.RunSpec(
        experiment_id="fsm", sut=synthetic_sut(), clients=clients, repeats=repeats,
        settings=short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=qps),
    )


def test_a_run_goes_pending_deploying_running_succeeded_with_summed_progress(app: ControllerApp,
                                                                             script: Script) -> None:
    script.progress_events = 5
    run = app.runs.start_run(server_run(clients=2, qps=200.0, repeats=2))
    states: list[int] = []
    peak = 0.0
    for event in app.runs.watch_run(run.run_id, lambda: True):
        if not states or states[-1] != event.state:
            states.append(event.state)
        peak = max(peak, event.run.progress.live_qps)
    final = app.runs.get_run(run.run_id)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert states[0] in (common_pb2.RUN_STATE_PENDING, common_pb2.RUN_STATE_DEPLOYING)
    assert common_pb2.RUN_STATE_RUNNING in states and states[-1] == common_pb2.RUN_STATE_SUCCEEDED
    # A RunSpec's target is each client's: 2 x 200, not the last reporter's 200.
    assert peak == pytest.approx(400.0)
    assert [r.repeat for r in final.results] == [1, 2] and len(final.results[0].clients) == 2
    assert all(t.record_sample_latencies for t in script.tests)  # one measuring mode


def test_a_cancel_during_the_test_ends_it_cancelled_and_keeps_nothing_running(app: ControllerApp,
                                                                              script: Script) -> None:
    script.hang = True
    run = app.runs.start_run(server_run())
    assert script.started.wait(10)
    app.runs.cancel_run(run.run_id)
    final = app.runs.wait(run.run_id, 10)
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert script.cancelled.is_set()  # the LoadGen agent was told
    assert not [a for a in backend(app).agents() if a.name.startswith("sut-run-")]  # the ephemeral SUT went


def test_a_cancel_before_the_test_starts_starts_none(app: ControllerApp, script: Script) -> None:
    run = app.runs.start_run(server_run(repeats=3))
    app.runs.cancel_run(run.run_id)
    final = app.runs.wait(run.run_id, 10)
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert len(script.tests) <= 1


def test_a_loadgen_agent_that_dies_mid_test_fails_the_run_naming_it(app: ControllerApp, script: Script) -> None:
    script.hang = True
    run = app.runs.start_run(server_run())
    assert script.started.wait(10)
    loadgen = next(a.name for a in backend(app).agents() if a.kind.value == "loadgen-agent")
    backend(app).kill(loadgen)
    final = app.runs.wait(run.run_id, 10)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "LoadGen agent" in final.error, final.error
    # The next run gets a fresh LoadGen agent and succeeds.
    script.hang = False
    script.cancelled.clear()
    again = app.runs.wait(app.runs.start_run(server_run()).run_id, 10)
    assert again.state == common_pb2.RUN_STATE_SUCCEEDED, again.error
    assert backend(app).started.count(loadgen) == 2


def test_the_peak_search_brackets_the_capacity(app: ControllerApp, script: Script) -> None:
    script.progress_events = 1
    script.verdict = lambda settings: settings.server_target_qps <= 230.0
    spec = controller_pb2.ExperimentSpec(
        experiment_id="fsm-peak", sut=synthetic_sut(), skip_calibration=True,
        settings=short_settings(common_pb2.SCENARIO_SERVER),
        sweep=controller_pb2.Sweep(scenarios=[common_pb2.SCENARIO_SERVER], server_target_qps=[50]),
        search=controller_pb2.PeakSearch(latency_bound=durations.from_seconds(0.040), low_qps=50, high_qps=800,
                                         tolerance=0.05, percentile=99),
    )
    app.experiments.start(spec)
    final = app.experiments.wait("fsm-peak", timeout=30)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    peak = final.peaks[0]
    assert 230.0 / 1.05 <= peak.peak_qps <= 230.0, peak


def test_a_failed_anchor_is_confirmed_before_the_search_gives_up(app: ControllerApp, script: Script) -> None:
    """One noisy probe at the low end (a stall on a busy machine) does not end the search at 0."""
    script.progress_events = 1
    probes: list[float] = []
    lock = threading.Lock()

    def verdict(settings: common_pb2.LoadGenSettings) -> bool:
        with lock:
            probes.append(settings.server_target_qps)
            first = len(probes) == 1
        return not first and settings.server_target_qps <= 230.0

    script.verdict = verdict
    spec = controller_pb2.ExperimentSpec(
        experiment_id="fsm-anchor", sut=synthetic_sut(), skip_calibration=True,
        settings=short_settings(common_pb2.SCENARIO_SERVER),
        sweep=controller_pb2.Sweep(scenarios=[common_pb2.SCENARIO_SERVER], server_target_qps=[50]),
        search=controller_pb2.PeakSearch(latency_bound=durations.from_seconds(0.040), low_qps=50, high_qps=800,
                                         tolerance=0.2, percentile=99),
    )
    app.experiments.start(spec)
    final = app.experiments.wait("fsm-anchor", timeout=30)
    assert final.peaks[0].peak_qps > 0 and probes[:2] == [50.0, 50.0]

