"""SUT agent gRPC server."""

from __future__ import annotations

from mecbench.core.server import RunningServer, build_server, serve_until_signalled
from mecbench.core.tls import TlsSettings, ssl_server_context
from mecbench.v1 import sut_agent_pb2, sut_agent_pb2_grpc
from sut_agent.dataplane import DataPlane
from sut_agent.lifecycle import BackendManager
from sut_agent.metrics import SutAgentCollector
from sut_agent.servicer import SutAgentServicer
from sut_agent.settings import SutAgentSettings
from sut_agent.tcp_dataplane import TcpDataPlaneServer

SERVICE_NAME = sut_agent_pb2.DESCRIPTOR.services_by_name["SutAgent"].full_name


def create_server(
    address: str, settings: SutAgentSettings | None = None, manager: BackendManager | None = None
) -> tuple[RunningServer, int]:
    """Start a SUT agent on `address` (port 0 picks one); returns the server and its port.
    `manager` lets tests (and embedders) reach the backend and stats directly."""
    settings = settings or SutAgentSettings.load()
    manager = manager or BackendManager(settings)
    dataplane = DataPlane(manager, settings)
    # The TCP data plane takes the same certificates and the same allowed callers as gRPC.
    tls = TlsSettings.load("SUT")
    running = build_server(
        address,
        lambda server: sut_agent_pb2_grpc.add_SutAgentServicer_to_server(SutAgentServicer(manager, dataplane), server),
        [SERVICE_NAME],
        max_workers=settings.max_workers,
        metrics_port=settings.metrics_port,
        collectors=[SutAgentCollector(manager)],
        tls=tls,
    )
    if settings.tcp_data_plane:
        tcp = TcpDataPlaneServer(
            dataplane, running.host, settings.tcp_data_plane_port,
            ssl_context=ssl_server_context(tls), allowed_clients=tls.allowed_clients,
        )
        manager.tcp_data_plane = tcp
        manager.tcp_data_plane_port = tcp.port
        running.on_stop.append(tcp.close)
    running.on_stop.append(manager.close)
    return running, running.port


def serve(address: str, settings: SutAgentSettings | None = None) -> None:
    running, _port = create_server(address, settings)
    serve_until_signalled(running)
