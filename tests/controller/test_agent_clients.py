"""The agents' gRPC clients (controller/agent_clients.py): a failed call or a broken stream is a
domain error of its status code naming the agent, decoded once; a stream its owner cancels ends
quietly. A servicer on loopback stands in for the node agent."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from controller.agent_clients import GrpcAgentConnector, GrpcLoadGenAgentClient, NodeAgentClient
from controller.backends.base import AgentHandle, AgentKind
from mecbench.core.errors import NotFound, Unavailable
from mecbench.core.server import RunningServer, build_server
from mecbench.core.tls import TlsSettings
from mecbench.v1 import common_pb2, loadgen_agent_pb2, node_agent_pb2, node_agent_pb2_grpc


class Telemetry(node_agent_pb2_grpc.NodeAgentServicer):
    """Samples until the client goes; ClearShaping of an unknown owner is NOT_FOUND."""

    def StreamTelemetry(
        self, request: node_agent_pb2.StreamTelemetryRequest, context: grpc.ServicerContext
    ) -> Iterator[node_agent_pb2.StreamTelemetryResponse]:
        while context.is_active():
            yield node_agent_pb2.StreamTelemetryResponse(sample=common_pb2.TelemetrySample(node="here"))
            time.sleep(0.005)

    def ClearShaping(
        self, request: node_agent_pb2.ClearShapingRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ClearShapingResponse:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no shaping of {request.owner}")


@pytest.fixture
def node() -> Iterator[RunningServer]:
    running = build_server(
        "127.0.0.1:0", lambda server: node_agent_pb2_grpc.add_NodeAgentServicer_to_server(
            Telemetry(), server  # type: ignore[abstract]  # serves only what the tests call
        ),
        ["mecbench.v1.NodeAgent"], max_workers=4, tls=TlsSettings(),
    )
    yield running
    running.stop(grace=0)


def test_a_refused_call_is_unavailable_naming_the_agent() -> None:
    client = GrpcLoadGenAgentClient("127.0.0.1:1", "LoadGen agent lg-x")
    try:
        with pytest.raises(Unavailable, match=r"^LoadGen agent lg-x: "):
            client.cancel_test("s-1")
        stream = client.run_test(loadgen_agent_pb2.RunTestRequest(session_id="s-1"), timeout=5, where="client 3")
        with pytest.raises(Unavailable, match=r"^LoadGen agent lg-x \(client 3\): "):
            list(stream)
    finally:
        client.close()


@pytest.fixture
def client(node: RunningServer) -> Iterator[NodeAgentClient]:
    """The node agent's client as the pool gets it from the default connector."""
    agent = AgentHandle(name="node-agent", kind=AgentKind.NODE, address=node.address, node="here")
    made = GrpcAgentConnector().node(agent)
    yield made
    made.close()


def test_the_status_code_gives_the_error_class(client: NodeAgentClient) -> None:
    assert client.component == "node agent"
    with pytest.raises(NotFound, match=r"^node agent: no shaping of run-1$"):
        client.clear_shaping("run-1")


def test_a_stream_cancelled_by_its_owner_ends_quietly_and_one_whose_agent_dies_raises(
    node: RunningServer, client: NodeAgentClient,
) -> None:
    stream = client.stream_telemetry(node_agent_pb2.StreamTelemetryRequest())
    replies = iter(stream)
    assert next(replies).sample.node == "here"
    stream.cancel()
    assert all(r.sample.node == "here" for r in replies)  # what was in flight, then the end: no error
    broken = iter(client.stream_telemetry(node_agent_pb2.StreamTelemetryRequest()))
    assert next(broken).sample.node == "here"
    node.stop(grace=0)
    with pytest.raises(Unavailable, match=r"^node agent: "):
        list(broken)
