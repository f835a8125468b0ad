"""Client-side channel helpers shared by the controller, the LoadGen agent, the SDK and tests."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mecbench.core.errors import Unavailable
from mecbench.core.server import MAX_MESSAGE_BYTES
from mecbench.core.tls import TlsSettings, channel_credentials, channel_options

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Loopback and LAN peers: keep idle streams open between tests of a session.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    extra_options: list[tuple[str, int | str]] | None = None,
    *,
    plaintext: bool = False,
) -> grpc.Channel:
    """A channel to a MECBench service: with `credentials` when given, else over TLS with this
    process's identity when the environment configures TLS (mecbench.core.tls), else plaintext.
    `plaintext` skips the environment: for servers that are not ours (an external inference
    server) and for clients whose caller chose explicitly (the SDK)."""
    options = [*CHANNEL_OPTIONS, *(extra_options or [])]
    if credentials is None and not plaintext:
        tls = TlsSettings.load()
        credentials = channel_credentials(tls)
        options += channel_options(tls)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def wait_until_serving(channel: grpc.Channel, service: str = "", timeout: float = 30.0) -> None:
    """Poll the standard health service until `service` reports SERVING or `timeout` passes."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(f"{service or 'server'} not serving after {timeout:.0f}s: {last_error}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 2.0))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            last_error = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.05)
