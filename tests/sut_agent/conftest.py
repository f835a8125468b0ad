"""A real SUT agent on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.core.server import RunningServer
from mecbench.v1 import sut_agent_pb2, sut_agent_pb2_grpc
from sut_agent.lifecycle import BackendManager
from sut_agent.server import create_server
from sut_agent.settings import SutAgentSettings


@dataclass
class Agent:
    server: RunningServer
    manager: BackendManager
    channel: grpc.Channel
    stub: sut_agent_pb2_grpc.SutAgentStub

    def start(self, config: sut_agent_pb2.SutConfig, restart: bool = True) -> sut_agent_pb2.SutStatus:
        reply: sut_agent_pb2.StartResponse = self.stub.Start(
            sut_agent_pb2.StartRequest(config=config, restart=restart), timeout=30
        )
        return reply.status

    def stats(self, reset: bool = False) -> sut_agent_pb2.SutStats:
        reply: sut_agent_pb2.GetStatsResponse = self.stub.GetStats(sut_agent_pb2.GetStatsRequest(reset=reset))
        return reply.stats

    def infer(self, ids: list[int], payloads: list[bytes] | None = None) -> sut_agent_pb2.ResponseBatch:
        batch = sut_agent_pb2.QueryBatch(
            sample_ids=ids, sample_indices=[i % 1000 for i in ids], payloads=payloads or []
        )
        reply: sut_agent_pb2.InferResponse = self.stub.Infer(sut_agent_pb2.InferRequest(batch=batch), timeout=30)
        return reply.batch


def synthetic(mean_s: float = 0.0, **fields: object) -> sut_agent_pb2.SutConfig:
    fields.setdefault("distribution", sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT)
    return sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(mean=durations.from_seconds(mean_s), **fields)  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    settings = SutAgentSettings.load(max_workers=32)
    manager = BackendManager(settings)
    server, port = create_server("127.0.0.1:0", settings, manager=manager)
    channel = open_channel(f"127.0.0.1:{port}")
    yield Agent(server, manager, channel, sut_agent_pb2_grpc.SutAgentStub(channel))
    channel.close()
    server.stop(1)
