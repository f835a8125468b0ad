"""A real controller on an ephemeral loopback port, with agents as real child processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.core.server import RunningServer
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2


@dataclass
class Stack:
    app: ControllerApp
    server: RunningServer
    channel: grpc.Channel
    stub: controller_pb2_grpc.ControllerStub
    data_dir: Path

    def wait(self, run_id: str, timeout: float = 60.0) -> controller_pb2.Run:
        return self.app.runs.wait(run_id, timeout)


def synthetic_sut(mean_s: float = 0.002, concurrency: int = 0) -> sut_agent_pb2.SutConfig:
    return sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(
            distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT,
            mean=durations.from_seconds(mean_s),
            max_concurrency=concurrency,
        )
    )


def short_settings(scenario: int, **fields: object) -> common_pb2.LoadGenSettings:
    """Tests of about a second; LoadGen's mlperf.conf would ask for ten minutes."""
    base: dict[str, object] = {"scenario": scenario, "min_duration": durations.from_seconds(1.0), "min_query_count": 50}
    if scenario == common_pb2.SCENARIO_SERVER:
        base |= {"server_target_qps": 100.0, "server_target_latency": durations.from_seconds(0.050)}
    if scenario == common_pb2.SCENARIO_OFFLINE:
        base |= {"offline_expected_qps": 500.0}
    if scenario == common_pb2.SCENARIO_MULTI_STREAM:
        base |= {"multi_stream_samples_per_query": 4, "min_query_count": 50}
    base |= fields
    return common_pb2.LoadGenSettings(**base)  # type: ignore[arg-type]


def start_stack(data_dir: Path) -> Stack:
    settings = ControllerSettings.load(data_dir=data_dir)
    app = ControllerApp(settings)
    server, port = create_server("127.0.0.1:0", settings, app=app)
    channel = open_channel(f"127.0.0.1:{port}")
    return Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), data_dir)


def stop_stack(stack: Stack) -> None:
    stack.channel.close()
    stack.server.stop(grace=1.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("controller"))
    running.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="sut-2ms", config=synthetic_sut(0.002)))
    yield running
    stop_stack(running)

