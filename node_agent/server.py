"""Node agent gRPC server."""

from __future__ import annotations

import grpc

from mecbench.core.server import RunningServer, build_server, serve_until_signalled
from mecbench.core.tls import TlsSettings
from mecbench.v1 import node_agent_pb2, node_agent_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.metrics import NodeAgentCollector
from node_agent.servicer import NodeAgentServicer
from node_agent.settings import NodeAgentSettings

SERVICE_NAME = node_agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name


def create_server(
    address: str, settings: NodeAgentSettings | None = None, agent: NodeAgent | None = None
) -> tuple[RunningServer, int]:
    """Start a node agent on `address` (port 0 picks one); returns the server and its port.
    Starting reconciles what an earlier agent sharing the state directory left behind.
    `agent` lets tests (and embedders) pass a NodeAgent with a declared GPU inventory."""
    settings = settings or NodeAgentSettings.load()
    agent = agent or NodeAgent(settings)
    holder: list[NodeAgentServicer] = []

    def register(server: grpc.Server) -> None:
        servicer = NodeAgentServicer(agent, address)
        holder.append(servicer)
        node_agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)

    running = build_server(
        address,
        register,
        [SERVICE_NAME],
        max_workers=settings.max_workers,
        metrics_port=settings.metrics_port,
        collectors=[NodeAgentCollector(agent)],
        tls=TlsSettings.load("NODE_AGENT"),
    )
    holder[0].address = running.address
    running.on_stop.append(agent.close)
    running.on_parent_gone.append(agent.outlive_owner)
    return running, running.port


def serve(address: str, settings: NodeAgentSettings | None = None) -> None:
    running, _port = create_server(address, settings)
    serve_until_signalled(running)
