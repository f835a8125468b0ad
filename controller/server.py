"""Controller gRPC server."""

from __future__ import annotations

from controller.app import ControllerApp
from controller.auth import TokenAuthorizer
from controller.metrics import ControllerCollector
from controller.servicer import ControllerServicer
from controller.settings import ControllerSettings
from mecbench.core.logging import get_logger
from mecbench.core.server import RunningServer, build_server, serve_until_signalled
from mecbench.core.tls import TlsSettings
from mecbench.v1 import controller_pb2, controller_pb2_grpc

log = get_logger("controller.server")

SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["Controller"].full_name


def create_server(
    address: str, settings: ControllerSettings | None = None, app: ControllerApp | None = None
) -> tuple[RunningServer, int]:
    settings = settings or ControllerSettings.load()
    # Before the app: a bad tokens file or TLS setting stops start-up before anything is started.
    tls = TlsSettings.load("CONTROLLER")
    authorizer = TokenAuthorizer.from_file(settings.tokens_file) if settings.tokens_file else None
    app = app or ControllerApp(settings)
    running = build_server(
        address,
        lambda server: controller_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(app), server),
        [SERVICE_NAME],
        max_workers=settings.max_workers,
        metrics_port=settings.metrics_port,
        collectors=[ControllerCollector(app)],
        tls=tls,
        authorizer=authorizer,
    )
    log.info("controller_api_security", tls=running.tls, client_auth=tls.client_auth,
             tokens=len(authorizer) if authorizer else 0)
    running.on_stop.append(app.close)
    return running, running.port


def serve(address: str, settings: ControllerSettings | None = None) -> None:
    running, _port = create_server(address, settings)
    serve_until_signalled(running)
