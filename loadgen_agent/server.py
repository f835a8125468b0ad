"""LoadGen agent gRPC server."""

from __future__ import annotations

from loadgen_agent.metrics import LoadGenCollector
from loadgen_agent.servicer import LoadGenAgentServicer
from loadgen_agent.sessions import SessionManager
from loadgen_agent.settings import LoadGenAgentSettings
from mecbench.core.server import RunningServer, build_server, serve_until_signalled
from mecbench.core.tls import TlsSettings
from mecbench.v1 import loadgen_agent_pb2, loadgen_agent_pb2_grpc

SERVICE_NAME = loadgen_agent_pb2.DESCRIPTOR.services_by_name["LoadGenAgent"].full_name


def create_server(
    address: str, settings: LoadGenAgentSettings | None = None, manager: SessionManager | None = None
) -> tuple[RunningServer, int]:
    """Start the agent on `address` (port 0 picks one); stopping the server closes every session
    and so ends every session process."""
    settings = settings or LoadGenAgentSettings.load()
    manager = manager or SessionManager(settings)
    running = build_server(
        address,
        lambda server: loadgen_agent_pb2_grpc.add_LoadGenAgentServicer_to_server(LoadGenAgentServicer(manager), server),
        [SERVICE_NAME],
        max_workers=settings.max_workers,
        metrics_port=settings.metrics_port,
        collectors=[LoadGenCollector(manager)],
        tls=TlsSettings.load("LOADGEN"),
    )
    running.on_stop.append(manager.close)
    return running, running.port


def serve(address: str, settings: LoadGenAgentSettings | None = None) -> None:
    running, _port = create_server(address, settings)
    serve_until_signalled(running)
