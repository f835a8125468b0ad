"""Server bootstrap shared by every service: one thread-pool gRPC server with the error
interceptor, the standard health service and server reflection, bound to an address whose port
may be 0 (the bound port is returned); optionally a Prometheus `/metrics` endpoint beside it.
TLS (and mutual TLS, and which client certificates may call) comes from the environment
(mecbench.core.tls)."""

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
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from mecbench.core.errors import InvalidArgument, PermissionDenied
from mecbench.core.interceptor import Authorizer, ErrorMappingInterceptor
from mecbench.core.logging import get_logger
from mecbench.core.metrics import GuardedCollector, MetricsEndpoint, RpcMetrics
from mecbench.core.tls import TlsSettings, is_allowed, peer_identities, server_credentials

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
    # Run, before stopping, when the parent that started this server died (EXIT_WITH_PARENT):
    # what the service must not leave behind once nobody owns it any more.
    on_parent_gone: list[Callable[[], None]] = field(default_factory=list)
    # Set when the server has a /metrics endpoint: its registry and its bound port.
    metrics_registry: CollectorRegistry | None = None
    metrics: MetricsEndpoint | None = None
    # Whether the gRPC port speaks TLS.
    tls: bool = False

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on; None when metrics are off."""
        return self.metrics.port if self.metrics is not None else None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for `grace` seconds, then release."""
        self.health.enter_graceful_shutdown()
        # Before the hooks: they close what the collectors read (databases, sessions).
        if self.metrics is not None:
            self.metrics.close()
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


METRICS_HOST_ENV = "MECBENCH_METRICS_HOST"


def metrics_host() -> str:
    """Where `/metrics` listens: loopback, unless the operator names an address (a scraper on
    another host needs one; with TLS configured the endpoint is HTTPS)."""
    return os.environ.get(METRICS_HOST_ENV, "").strip() or "127.0.0.1"


def build_server(
    address: str,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    max_workers: int = 32,
    credentials: grpc.ServerCredentials | None = None,
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: ServerOptions = (),
    metrics_port: int = -1,
    collectors: Sequence[Collector] = (),
    tls: TlsSettings | None = None,
    authorizer: Authorizer | None = None,
) -> RunningServer:
    """Create, bind and start a server; returns it with the port actually bound.

    `metrics_port` >= 0 also serves Prometheus `/metrics` at that port (0: any free one, in
    `RunningServer.metrics_port`): RPC durations and codes, and what `collectors` read from the
    service when scraped. Below 0 no metrics are kept at all. It binds loopback unless the
    operator names another address (`MECBENCH_METRICS_HOST`), and is HTTPS (with client
    certificates where the gRPC port wants them) when TLS is configured.

    `tls` (default: `TlsSettings.load()`, the environment) makes the port TLS, and with
    `allowed_clients` refuses callers whose certificate names none of them; `credentials`, when
    given, take the place of its certificates. `authorizer` then decides on each RPC but health
    and reflection (the controller's bearer tokens).
    """
    host, _ = split_address(address)
    tls = TlsSettings.load() if tls is None else tls
    if credentials is None:
        credentials = server_credentials(tls)
    if tls.allowed_clients:
        authorizer = _require_identity(tls.allowed_clients, authorizer)
    registry: CollectorRegistry | None = None
    rpc_metrics: RpcMetrics | None = None
    if metrics_port >= 0:
        registry = CollectorRegistry()
        rpc_metrics = RpcMetrics(registry)
        for collector in collectors:
            registry.register(GuardedCollector(collector, type(collector).__name__))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[*extra_interceptors, ErrorMappingInterceptor(rpc_metrics, authorizer)],
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
    endpoint: MetricsEndpoint | None = None
    if registry is not None:
        try:
            endpoint = MetricsEndpoint(metrics_host(), metrics_port, registry, tls if credentials else None)
        except OSError:
            server.stop(None)
            raise
        log.info("metrics_listening", address=endpoint.address, url=f"{endpoint.scheme}://{endpoint.address}/metrics")
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server=server, port=port, host=host, health=health_servicer, service_names=names,
        metrics_registry=registry, metrics=endpoint, tls=credentials is not None,
    )


def _require_identity(allowed: Sequence[str], then: Authorizer | None) -> Authorizer:
    """An authorizer that admits only callers whose certificate names one of `allowed`, then
    asks `then` (if any)."""

    def authorize(method: str, context: grpc.ServicerContext) -> str | None:
        identities = peer_identities(context)
        if not is_allowed(identities, allowed):
            who = f"certificate {identities[0]!r}" if identities else "a caller without a certificate"
            raise PermissionDenied(f"{who} is not allowed to call this service")
        caller = then(method, context) if then is not None else None
        return caller or (identities[0] if identities else None)

    return authorize


# Set by a parent that keeps our stdin open for as long as it lives (the local backend): when it
# dies, even by SIGKILL, the kernel closes the pipe and the agent stops itself, so no agent
# outlives its controller. Unlike PR_SET_PDEATHSIG this does not depend on which parent thread
# forked us, and needs no code between fork and exec.
EXIT_WITH_PARENT_ENV = "MECBENCH_EXIT_WITH_PARENT"


def _stop_when_stdin_closes(stop: threading.Event, parent_gone: threading.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    log.info("parent_gone")
    parent_gone.set()
    stop.set()


def serve_until_signalled(running: RunningServer, grace: float = 5.0) -> None:
    """Announce the bound address, block until SIGTERM or SIGINT, then stop gracefully.

    The `listening on HOST:PORT` line on stdout is the agents' start-up protocol: the local
    backend reads it to learn the port an agent bound when asked for port 0.
    """
    sys.stdout.write(f"listening on {running.address}\n")
    sys.stdout.flush()
    log.info(
        "server_listening", address=running.address, services=running.service_names,
        metrics_port=running.metrics_port, tls=running.tls,
    )
    stop = threading.Event()
    parent_gone = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    if os.environ.get(EXIT_WITH_PARENT_ENV) == "1":
        threading.Thread(
            target=_stop_when_stdin_closes, args=(stop, parent_gone), name="parent-watch", daemon=True
        ).start()
    stop.wait()
    if parent_gone.is_set():
        for hook in running.on_parent_gone:
            try:
                hook()
            except Exception:
                log.exception("parent_gone_hook_failed")
    running.stop(grace)
    log.info("server_stopped", port=running.port)
