"""A LoadGen test through the controller in the netns topology: the node agent shapes the edge's
data link, and a 5 Mbit/s profile slows responses of a known size by what the rate predicts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, node_agent_pb2, sut_agent_pb2
from tests.conftest import requires_root
from tests.controller.conftest import Stack, short_settings, stop_stack

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
    listed = netns_stack.app.pool.node_agent().stub.ListShaping(node_agent_pb2.ListShapingRequest())
    assert not listed.shapings
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
