"""Controller gRPC server."""

from __future__ import annotations

from controller.app import ControllerApp
from controller.servicer import ControllerServicer
from controller.settings import ControllerSettings
from mecbench.core.server import RunningServer, build_server, serve_until_signalled
from mecbench.v1 import controller_pb2, controller_pb2_grpc

SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["Controller"].full_name


def create_server(
    address: str, settings: ControllerSettings | None = None, app: ControllerApp | None = None
) -> tuple[RunningServer, int]:
    settings = settings or ControllerSettings.load()
    app = app or ControllerApp(settings)
    running = build_server(
        address,
        lambda server: controller_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(app), server),
        [SERVICE_NAME],
        max_workers=settings.max_workers,
    )
    running.on_stop.append(app.close)
    return running, running.port


def serve(address: str, settings: ControllerSettings | None = None) -> None:
    running, _port = create_server(address, settings)
    serve_until_signalled(running)
