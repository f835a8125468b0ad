"""The controller's run state machine on in-memory fake agents (tests/controller/fakes.py):
progress, cancel races, agent deaths and the peak search, in milliseconds, through the
controller's real code and no socket."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.app import ControllerApp
from controller.backends.base import ShapingPoint
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.errors import FailedPrecondition
from mecbench.v1 import common_pb2, controller_pb2
from tests.controller.conftest import short_settings, synthetic_sut
from tests.controller.fakes import FakeBackend, FakeNodeAgent, Script

AppFactory = Callable[..., ControllerApp]


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def make_app(tmp_path: Path, script: Script) -> Iterator[AppFactory]:
    """A controller on the fake agents, with `settings` overriding its defaults."""
    apps: list[ControllerApp] = []

    def make(**settings: object) -> ControllerApp:
        loaded = ControllerSettings.load(data_dir=tmp_path, **{"telemetry_interval_s": 0, **settings})
        fake = FakeBackend(script)
        apps.append(ControllerApp(loaded, backend=fake, connector=fake.connector))
        return apps[-1]

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def app(make_app: AppFactory) -> ControllerApp:
    return make_app()


def backend(app: ControllerApp) -> FakeBackend:
    fake = app.pool.backend
    assert isinstance(fake, FakeBackend)
    return fake


def agent_named(app: ControllerApp, prefix: str) -> str:
    (name,) = [a.name for a in backend(app).agents() if a.name.startswith(prefix)]
    return name


def server_run(clients: int = 1, qps: float = 200.0, repeats: int = 1) -> controller_pb2.RunSpec:
    return controller_pb2.RunSpec(
        experiment_id="fsm", sut=synthetic_sut(), clients=clients, repeats=repeats,
        settings=short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=qps),
    )


def shaped_run() -> controller_pb2.RunSpec:
    spec = server_run()
    spec.network.CopyFrom(common_pb2.NetworkProfile(
        name="slow", netem=common_pb2.NetemConfig(delay=durations.from_seconds(0.010))
    ))
    return spec


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
    """The cancel arrives while the SUT is being deployed: no test starts, the SUT goes."""
    deploying, go_on = threading.Event(), threading.Event()

    def before_call(_agent: str, rpc: str) -> None:
        if rpc == "Start":
            deploying.set()
            assert go_on.wait(10)

    script.before_call = before_call
    run = app.runs.start_run(server_run(repeats=3))
    assert deploying.wait(10)
    app.runs.cancel_run(run.run_id)
    go_on.set()
    final = app.runs.wait(run.run_id, 10)
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert script.tests == [] and not final.results
    assert not [a for a in backend(app).agents() if a.name.startswith("sut-run-")]


def test_a_cancel_between_repeats_keeps_the_finished_ones_and_starts_no_more(app: ControllerApp,
                                                                             script: Script) -> None:
    run_ids: list[str] = []
    stats_calls = 0

    def before_call(_agent: str, rpc: str) -> None:
        nonlocal stats_calls
        if rpc == "GetStats":
            stats_calls += 1
            if stats_calls == 3:  # repeat 1 read its SUT's stats (reset, then after): repeat 2 resets next
                app.runs.cancel_run(run_ids[0])

    script.before_call = before_call
    run_ids.append(app.runs.start_run(server_run(repeats=3)).run_id)
    final = app.runs.wait(run_ids[0], 10)
    assert final.state == common_pb2.RUN_STATE_CANCELLED, final.error
    assert [r.repeat for r in final.results] == [1]
    assert len(script.tests) == 1


def test_a_cancel_racing_the_tests_start_cancels_that_test(app: ControllerApp, script: Script) -> None:
    """The cancel arrives as repeat 2's RunTest reaches the agent: that test ends cancelled."""
    run_ids: list[str] = []

    def before_call(_agent: str, rpc: str) -> None:
        if rpc == "RunTest" and len(script.tests) == 1:
            app.runs.cancel_run(run_ids[0])
            assert script.cancelled.wait(10)  # the CancelTest is at the agent before the test runs

    script.before_call = before_call
    script.hang = True
    run_ids.append(app.runs.start_run(server_run(repeats=3)).run_id)
    assert script.started.wait(10)
    script.hang = False
    final = app.runs.wait(run_ids[0], 10)
    assert final.state == common_pb2.RUN_STATE_CANCELLED, final.error
    assert [r.repeat for r in final.results] == [1] and len(script.tests) == 2


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


def test_a_sut_agent_that_dies_mid_test_fails_the_run_naming_it(app: ControllerApp, script: Script) -> None:
    app.pool.deploy_sut("victim", synthetic_sut())
    script.hang = True
    spec = server_run()
    spec.sut_id = "victim"
    run = app.runs.start_run(spec)
    assert script.started.wait(10)
    backend(app).kill("sut-victim")
    final = app.runs.wait(run.run_id, 10)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "SUT agent sut-victim is not running" in final.error, final.error
    # Deploying it again starts a fresh agent under the same id, and runs work.
    script.hang = False
    app.pool.deploy_sut("victim", synthetic_sut())
    again = app.runs.wait(app.runs.start_run(spec).run_id, 10)
    assert again.state == common_pb2.RUN_STATE_SUCCEEDED, again.error
    assert backend(app).started.count("sut-victim") == 2


def test_a_node_agent_that_dies_mid_shaped_run_fails_it_naming_it(make_app: AppFactory, script: Script) -> None:
    app = make_app(shaping_lease_s=0.3)
    script.hang = True
    run = app.runs.start_run(shaped_run())
    assert script.started.wait(10)
    node = backend(app).agent(app.pool.node_agent().agent, FakeNodeAgent)
    assert [s.target.interface for s in node.shapings.values()] == ["client-0"]  # shaped while it runs
    backend(app).kill(agent_named(app, "node-agent"))
    final = app.runs.wait(run.run_id, 10)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "node agent node-agent is not running" in final.error, final.error
    # The next shaped run gets a fresh node agent (which renews its lease while it lasts), and
    # its shaping goes with it.
    script.hang = False
    script.progress_events = 25
    script.cancelled.clear()
    again = app.runs.wait(app.runs.start_run(shaped_run()).run_id, 10)
    assert again.state == common_pb2.RUN_STATE_SUCCEEDED, again.error
    fresh = backend(app).agent(app.pool.node_agent().agent, FakeNodeAgent)
    assert fresh is not node and fresh.renewals > 0 and not fresh.shapings


def test_a_log_past_the_limit_fails_the_run_naming_the_file(make_app: AppFactory, script: Script) -> None:
    app = make_app(max_log_bytes=8)
    final = app.runs.wait(app.runs.start_run(server_run()).run_id, 10)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "log file mlperf_log_summary.txt exceeds 8 bytes" in final.error, final.error


def test_telemetry_flows_for_the_length_of_a_repeat(make_app: AppFactory, script: Script) -> None:
    app = make_app(telemetry_interval_s=0.005)
    script.progress_events = 10
    final = app.runs.wait(app.runs.start_run(server_run()).run_id, 10)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    samples = app.runs.telemetry(final.run_id, 0)
    assert samples and all(s.node == "fake-node" for s in samples)
    assert not [t for t in threading.enumerate() if t.name == "telemetry"]  # its stream was cancelled


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


class OneEndedClusterLinks(FakeBackend):
    """A backend that, like Kubernetes, shapes a cluster member link only as a whole."""

    cluster_link_ends = 1

    def cluster_shaping_points(self, index: int) -> list[ShapingPoint]:
        return [ShapingPoint(f"worker-{index}", "")]


def test_one_end_of_a_member_link_on_a_backend_without_ends_is_refused_at_start_run(
    tmp_path: Path, script: Script
) -> None:
    fake = OneEndedClusterLinks(script)
    app = ControllerApp(ControllerSettings.load(data_dir=tmp_path, telemetry_interval_s=0), backend=fake,
                        connector=fake.connector)
    try:
        for side in (common_pb2.SHAPING_SIDE_SUT, common_pb2.SHAPING_SIDE_LOADGEN):
            spec = server_run()
            spec.ClearField("sut")
            spec.sut_id = "cluster"  # deployed or not: the side is refused first
            spec.cluster_network.CopyFrom(common_pb2.NetworkProfile(
                name="interconnect", netem=common_pb2.NetemConfig(rate_bps=50_000_000), side=side
            ))
            with pytest.raises(FailedPrecondition, match=r"^spec\.cluster_network\.side: the fake backend"):
                app.runs.start_run(spec)
        # Refused before anything was recorded or started.
        assert not app.runs.list_runs(controller_pb2.ListRunsRequest()).runs
        assert not fake.started
    finally:
        app.close()
