"""A LoadGen test through the controller in the netns topology: the node agent shapes the edge's
data link, and a 5 Mbit/s profile slows responses of a known size by what the rate predicts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.experiment_file import parse_experiment
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2
from tests.conftest import requires_root
from tests.controller.conftest import Stack, short_settings, stop_stack
from tests.loadgen_agent.conftest import process_exists

pytestmark = requires_root

RESPONSE_BYTES = 62_500  # half a megabit: 100 ms at 5 Mbit/s
RATE_BPS = 5_000_000


@pytest.fixture(scope="module")
def netns_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("netns-controller")
    settings = ControllerSettings.load(
        data_dir=data_dir, topology="netns", topology_clients=1, topology_slot=43, topology_name="mbe2e",
        telemetry_interval_s=0.2,
    )
    app = ControllerApp(settings)
    server, port = create_server("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    stack = Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), data_dir)
    stack.stub.DeploySut(
        controller_pb2.DeploySutRequest(
            sut_id="sut-big-replies",
            config=sut_agent_pb2.SutConfig(
                synthetic=sut_agent_pb2.SyntheticBackendConfig(
                    distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT,
                    mean=durations.from_seconds(0.001),
                    response_bytes=RESPONSE_BYTES,
                )
            ),
        )
    )
    yield stack
    stop_stack(stack)


def p50_ms(stack: Stack, network: common_pb2.NetworkProfile | None) -> tuple[float, controller_pb2.Run]:
    spec = controller_pb2.RunSpec(
        experiment_id="netns-e2e",
        sut_id="sut-big-replies",
        settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=20),
    )
    if network is not None:
        spec.network.CopyFrom(network)
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.app.runs.wait(run.run_id, 120)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    return durations.to_ns(final.results[0].aggregate.latency.p50) / 1e6, final


def test_a_5_mbit_profile_slows_known_payloads_by_what_the_rate_predicts(netns_stack: Stack) -> None:
    unshaped, _ = p50_ms(netns_stack, None)
    profile = common_pb2.NetworkProfile(
        name="5mbit", netem=common_pb2.NetemConfig(rate_bps=RATE_BPS), side=common_pb2.SHAPING_SIDE_SUT
    )
    shaped, run = p50_ms(netns_stack, profile)
    predicted_ms = RESPONSE_BYTES * 8 / RATE_BPS * 1000
    slowdown = shaped - unshaped
    print(f"unshaped p50 {unshaped:.1f} ms, shaped p50 {shaped:.1f} ms, predicted +{predicted_ms:.0f} ms")
    # TCP/IP headers add ~3%; the token bucket's burst lets a few kilobytes through early.
    assert 0.9 * predicted_ms <= slowdown <= 1.25 * predicted_ms, (unshaped, shaped)
    # The shaping went away with the run, and the node agent recorded the link's traffic.
    nodes = netns_stack.stub.ListNodes(controller_pb2.ListNodesRequest()).nodes
    assert nodes and nodes[0].supported_qdiscs
    assert not netns_stack.app.pool.node_agent().client.list_shaping()
    metrics = netns_stack.stub.GetMetrics(controller_pb2.GetMetricsRequest(run_id=run.run_id))
    assert metrics.samples and any(i.tx_bytes > 0 for s in metrics.samples for i in s.interfaces)


def test_the_topology_goes_away_with_the_controller(tmp_path: Path) -> None:
    settings = ControllerSettings.load(
        data_dir=tmp_path, topology="netns", topology_clients=1, topology_slot=44, topology_name="mbgone"
    )
    app = ControllerApp(settings)
    server, _port = create_server("127.0.0.1:0", settings, app=app)
    assert any(name.startswith("mb-mbgone") for name in netns.listnetns())
    server.stop(grace=1)
    assert not any(name.startswith("mb-mbgone") for name in netns.listnetns())


def test_cancelling_an_experiment_mid_point_cleans_up_and_keeps_finished_points(netns_stack: Stack) -> None:
    """Point 1 (SingleStream) finishes; point 2 (a 60 s Server test, shaped, LoadGen job mode) is
    cancelled while it runs: no LoadGen job is left, no shaping, and point 1's results stay."""
    spec = parse_experiment(
        """
        experiment_id: cancel-mid-point
        sut: {synthetic: {distribution: SERVICE_TIME_DISTRIBUTION_CONSTANT, mean: 0.001s}}
        loadgen: {mode: LOAD_GEN_MODE_JOB}
        settings: {min_duration: 1s, min_query_count: 50, server_target_latency: 0.05s,
                   single_stream_expected_latency: 0.002s, skip_mlperf_defaults: true}
        overrides: [{scenario: Server, settings: {min_duration: 60s}}]
        sweep:
          scenarios: [SCENARIO_SINGLE_STREAM, SCENARIO_SERVER]
          server_target_qps: [100]
          network_profiles: [{name: edge-50mbit, netem: {bandwidth: 50mbit}}]
        """
    )
    experiment = netns_stack.stub.StartExperiment(controller_pb2.StartExperimentRequest(spec=spec)).experiment
    experiment_id = experiment.experiment_id
    deadline = time.monotonic() + 90
    while True:
        experiment = netns_stack.app.experiments.get(experiment_id)
        if len(experiment.run_ids) == 2:
            second = netns_stack.app.runs.get_run(experiment.run_ids[1])
            if second.state == common_pb2.RUN_STATE_RUNNING and second.progress.samples_completed > 0:
                break
        assert experiment.state == common_pb2.RUN_STATE_RUNNING, experiment.error
        assert time.monotonic() < deadline, "the second point never started"
        time.sleep(0.1)
    assert netns_stack.app.pool.node_agent().client.list_shaping()  # shaped while it runs
    jobs = [a.pid for a in netns_stack.app.pool.backend.agents() if a.name.startswith("job-")]
    loadgen_processes = jobs + [pid for job in jobs for pid in _children(job)]
    assert jobs and len(loadgen_processes) > len(jobs)  # the job agent and its LoadGen session
    cancelled_at = time.monotonic()
    netns_stack.stub.CancelExperiment(controller_pb2.CancelExperimentRequest(experiment_id=experiment_id))
    final = netns_stack.app.experiments.wait(experiment_id, 30)
    assert final.state == common_pb2.RUN_STATE_CANCELLED
    assert time.monotonic() - cancelled_at < 15
    first, second = (netns_stack.app.runs.get_run(run_id) for run_id in final.run_ids)
    assert first.state == common_pb2.RUN_STATE_SUCCEEDED and second.state == common_pb2.RUN_STATE_CANCELLED
    kept = netns_stack.stub.ListResults(controller_pb2.ListResultsRequest(experiment_id=experiment_id)).results
    assert {r.run_id for r in kept} == {first.run_id, *final.calibration.run_ids}
    assert not netns_stack.app.pool.node_agent().client.list_shaping()
    assert not [a for a in netns_stack.app.pool.backend.agents() if a.name.startswith("job-")]
    deadline = time.monotonic() + 10
    while [pid for pid in loadgen_processes if process_exists(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in loadgen_processes if process_exists(pid)], "a LoadGen process outlived the cancel"


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def test_a_killed_node_agent_fails_the_shaped_run_and_leaves_no_shaping(netns_stack: Stack) -> None:
    import os
    import signal

    profile = common_pb2.NetworkProfile(name="edge-50mbit", netem=common_pb2.NetemConfig(rate_bps=50_000_000))
    spec = controller_pb2.RunSpec(
        experiment_id="netns-e2e", sut_id="sut-big-replies", network=profile,
        settings=short_settings(common_pb2.SCENARIO_SERVER, server_target_qps=20.0,
                                min_duration=durations.from_seconds(30)),
    )
    run_id = netns_stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run.run_id
    deadline = time.monotonic() + 60
    while netns_stack.app.runs.get_run(run_id).progress.samples_completed == 0:
        assert time.monotonic() < deadline, "the shaped run never started"
        time.sleep(0.1)
    node_pid = netns_stack.app.pool.node_agent().agent.pid
    killed_at = time.monotonic()
    os.kill(node_pid, signal.SIGKILL)
    final = netns_stack.app.runs.wait(run_id, 60)
    took = time.monotonic() - killed_at
    from tests.numbers import report

    report("faults", f"node agent killed: run {common_pb2.RunState.Name(final.state)} after {took:.1f}s: "
                     f"{final.error}")
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "node agent" in final.error
    assert took < 15
    # A fresh node agent took over the state directory, and the run's shaping is gone.
    node = netns_stack.app.pool.node_agent()
    assert node.agent.pid != node_pid
    assert not node.client.list_shaping()
    p50_ms(netns_stack, profile)  # and shaped runs work again
