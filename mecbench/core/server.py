"""Server bootstrap shared by every service: one thread-pool gRPC server with the error
interceptor, the standard health service and server reflection, bound to an address whose port
may be 0 (the bound port is returned)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mecbench.core.errors import InvalidArgument
from mecbench.core.interceptor import ErrorMappingInterceptor
from mecbench.core.logging import get_logger

log = get_logger("mecbench.server")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

ServerOptions = Sequence[tuple[str, int | str]]


@dataclass
class RunningServer:
    """A started server and what its owner needs to stop it well."""

    server: grpc.Server
    port: int
    host: str
    health: health.HealthServicer
    service_names: list[str]
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for `grace` seconds, then release."""
        self.health.enter_graceful_shutdown()
        for hook in self.on_stop:
            try:
                hook()
            except Exception:
                log.exception("stop_hook_failed")
        self.server.stop(grace).wait(grace + 1)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidArgument(f"expected HOST:PORT, got {address!r}", field="listen")
    return host.strip("[]"), int(port)


def build_server(
    address: str,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    max_workers: int = 32,
    credentials: grpc.ServerCredentials | None = None,
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: ServerOptions = (),
) -> RunningServer:
    """Create, bind and start a server; returns it with the port actually bound."""
    host, _ = split_address(address)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[*extra_interceptors, ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *options,
        ],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=port, host=host, health=health_servicer, service_names=names)


# Set by a parent that keeps our stdin open for as long as it lives (the local backend): when it
# dies, even by SIGKILL, the kernel closes the pipe and the agent stops itself, so no agent
# outlives its controller. Unlike PR_SET_PDEATHSIG this does not depend on which parent thread
# forked us, and needs no code between fork and exec.
EXIT_WITH_PARENT_ENV = "MECBENCH_EXIT_WITH_PARENT"


def _stop_when_stdin_closes(stop: threading.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    log.info("parent_gone")
    stop.set()


def serve_until_signalled(running: RunningServer, grace: float = 5.0) -> None:
    """Announce the bound address, block until SIGTERM or SIGINT, then stop gracefully.

    The `listening on HOST:PORT` line on stdout is the agents' start-up protocol: the local
    backend reads it to learn the port an agent bound when asked for port 0.
    """
    sys.stdout.write(f"listening on {running.address}\n")
    sys.stdout.flush()
    log.info("server_listening", address=running.address, services=running.service_names)
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    if os.environ.get(EXIT_WITH_PARENT_ENV) == "1":
        threading.Thread(target=_stop_when_stdin_closes, args=(stop,), name="parent-watch", daemon=True).start()
    stop.wait()
    running.stop(grace)
    log.info("server_stopped", port=running.port)
