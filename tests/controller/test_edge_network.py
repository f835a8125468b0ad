"""Edge networks as they are, through the controller in the netns topology (root): what the
network really did is kept with each repeat (probe and qdisc counters)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2
from tests.conftest import requires_root
from tests.controller.conftest import Stack, short_settings, stop_stack

pytestmark = [requires_root, pytest.mark.root]

RESPONSE_BYTES = 25_000
SUT_ID = "sut-25kb-replies"


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("edge-network")
    settings = ControllerSettings.load(
        data_dir=data_dir, topology="netns", topology_clients=2, topology_slot=45, topology_name="mbedge",
        telemetry_interval_s=0,
    )
    app = ControllerApp(settings)
    server, port = create_server("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    stack = Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), data_dir)
    stack.stub.DeploySut(
        controller_pb2.DeploySutRequest(
            sut_id=SUT_ID,
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


def run_to_end(stack: Stack, spec: controller_pb2.RunSpec) -> tuple[controller_pb2.Run, dict[str, Any]]:
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.app.runs.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    record = stack.stub.GetResult(controller_pb2.GetResultRequest(run_id=run.run_id, include_files=["result.json"]))
    (document,) = [json.loads(f.data) for f in record.files if f.name == "result.json"]
    return final, document


def test_an_overloaded_link_shows_drops_in_the_recorded_counters_and_the_probe_saw_the_asked_rate(
    edge_stack: Stack,
) -> None:
    rate_bps = 10_000_000
    spec = controller_pb2.RunSpec(
        experiment_id="edge-verified", sut_id=SUT_ID,
        # Offline: every sample at once, about 1.1 MB of replies queued behind a 10 Mbit/s bucket.
        settings=short_settings(common_pb2.SCENARIO_OFFLINE, offline_expected_qps=40.0, min_query_count=40),
        network=common_pb2.NetworkProfile(name="edge-10mbit", netem=common_pb2.NetemConfig(rate_bps=rate_bps)),
    )
    final, document = run_to_end(edge_stack, spec)
    network = document["network"]
    assert network["link_as_requested"] and not network["problems"]
    (probe,) = [p["probe"] for p in network["probes"]]
    assert probe["saturated"] and abs(probe["measured_rate_bps"] - rate_bps) / rate_bps < 0.10
    assert probe["peer_address"] and probe["rtt_samples"] > 0
    (root,) = [q for q in network["qdiscs"] if q["kind"] == "tbf"]
    print(f"probe {probe['measured_rate_bps'] / 1e6:.3f} Mbit/s; repeat counters {root['delta']}, "
          f"peak backlog {root['peak_backlog_bytes']} B over {network['backlog_samples']} samples")
    assert root["params"]["rate_bps"] == str(rate_bps)
    delta = root["delta"]
    replies = final.results[0].aggregate.sample_count
    assert delta["bytes"] >= replies * RESPONSE_BYTES  # every reply crossed the shaped link
    assert delta["overlimits"] > 0 and delta["drops"] > 0
    assert root["peak_backlog_bytes"] > 0
    assert final.results[0].aggregate.valid or "link not as requested" not in " ".join(
        final.results[0].aggregate.invalid_reasons
    )
