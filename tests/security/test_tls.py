"""TLS and mutual TLS end to end: a real controller with TLS from its environment, the agents it
starts inheriting it, a real run over both data planes, and the callers that must be refused."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mecbench.client import Client
from mecbench.client_errors import ClientError
from mecbench.core.framing import read_frame, write_frame
from mecbench.core.settings import SettingsError
from mecbench.core.tls import TlsSettings, TlsStream, ssl_client_context, ssl_server_context
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2, sut_agent_pb2_grpc
from tests.controller.conftest import Stack, short_settings, start_stack, stop_stack, synthetic_sut
from tests.security.ca import Identity
from tests.security.conftest import Pki

SUT_ID = "sut-tls"


@pytest.fixture(scope="module")
def secure_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A controller whose environment asks for mutual TLS everywhere: agents accept only the
    controller's certificate (which their LoadGen agents share), while the controller API takes
    any certificate from the CA."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in pki.controller.env(client_auth="true", allowed_clients="controller").items():
            patch.setenv(name, value)
        patch.setenv("MECBENCH_CONTROLLER_TLS_ALLOWED_CLIENTS", "")
        stack = start_stack(tmp_path_factory.mktemp("controller"))
        try:
            yield stack
        finally:
            stop_stack(stack)


def sdk(stack: Stack, pki: Pki, identity: Identity | None, **options: object) -> Client:
    """An SDK client of the stack's controller trusting the test CA, presenting `identity`."""
    files: dict[str, object] = {"ca_file": pki.ca.cert}
    if identity is not None:
        files |= {"cert_file": identity.cert, "key_file": identity.key}
    return Client(stack.server.address, retries=0, timeout_s=10, **files, **options)  # type: ignore[arg-type]


def sut_address(stack: Stack, pki: Pki) -> str:
    with sdk(stack, pki, pki.controller) as controller:
        deployment = controller.deploy_sut(SUT_ID, synthetic_sut(0.001))
    return deployment.endpoint.address


def secure_channel(address: str, identity: Identity | None, ca: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=identity.key.read_bytes() if identity else None,
        certificate_chain=identity.cert.read_bytes() if identity else None,
    )
    return grpc.secure_channel(address, credentials)


# --- a real run over TLS ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "transport",
    [loadgen_agent_pb2.DATA_PLANE_TRANSPORT_TCP, loadgen_agent_pb2.DATA_PLANE_TRANSPORT_GRPC],
    ids=["tcp", "grpc"],
)
def test_a_run_goes_end_to_end_over_mutual_tls(secure_stack: Stack, pki: Pki, transport: int) -> None:
    assert secure_stack.server.tls
    sut_address(secure_stack, pki)
    with sdk(secure_stack, pki, pki.controller) as controller:
        run = controller.start_run(
            controller_pb2.RunSpec(
                experiment_id="tls", sut_id=SUT_ID,
                settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=20),
                data_plane=loadgen_agent_pb2.DataPlaneOptions(transport=transport),  # type: ignore[arg-type]
            )
        )
        final = controller.wait_run(run.run_id, timeout=60)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    assert final.results[0].aggregate.sample_count > 0


# --- callers the controller refuses --------------------------------------------------------------


def test_a_plaintext_client_is_refused(secure_stack: Stack) -> None:
    with grpc.insecure_channel(secure_stack.server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_is_refused_when_client_auth_is_on(secure_stack: Stack, pki: Pki) -> None:
    with sdk(secure_stack, pki, None) as anonymous, pytest.raises(ClientError) as caught:
        anonymous.list_runs()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_from_another_ca_is_refused(secure_stack: Stack, pki: Pki) -> None:
    # Same CN as the controller's own certificate: the CA is what counts.
    with sdk(secure_stack, pki, pki.stranger) as stranger, pytest.raises(ClientError) as caught:
        stranger.list_runs()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_server_the_client_does_not_trust_is_refused(secure_stack: Stack, pki: Pki) -> None:
    other_ca = pki.stranger.ca
    with Client(secure_stack.server.address, ca_file=other_ca, cert_file=pki.controller.cert,
                key_file=pki.controller.key, retries=0, timeout_s=5) as wary, pytest.raises(ClientError) as caught:
        wary.list_runs()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_any_certificate_of_the_ca_may_use_the_controller_api(secure_stack: Stack, pki: Pki) -> None:
    # MECBENCH_CONTROLLER_TLS_ALLOWED_CLIENTS="" overrides the shared list for the controller.
    with sdk(secure_stack, pki, pki.intruder) as user:
        user.list_runs()


# --- agents accept only the controller's identity --------------------------------------------


def test_an_agent_refuses_a_caller_whose_certificate_is_not_allowed(secure_stack: Stack, pki: Pki) -> None:
    address = sut_address(secure_stack, pki)
    with secure_channel(address, pki.intruder, pki.ca.cert) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            sut_agent_pb2_grpc.SutAgentStub(channel).GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "intruder" in (caught.value.details() or "")
        # Health stays open to any TLS peer (probes).
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with secure_channel(address, pki.controller, pki.ca.cert) as channel:
        status = sut_agent_pb2_grpc.SutAgentStub(channel).GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10)
    assert status.status.tcp_data_plane_port > 0


def _tcp_data_plane(stack: Stack, pki: Pki) -> tuple[str, int]:
    address = sut_address(stack, pki)
    with secure_channel(address, pki.controller, pki.ca.cert) as channel:
        status = sut_agent_pb2_grpc.SutAgentStub(channel).GetStatus(sut_agent_pb2.GetStatusRequest(), timeout=10)
    return address.rpartition(":")[0], status.status.tcp_data_plane_port


def _tls_stream(address: tuple[str, int], identity: Identity, ca: Path) -> TlsStream:
    context = ssl_client_context(TlsSettings(cert=identity.cert, key=identity.key, ca=ca))
    assert context is not None
    connection = socket.create_connection(address, timeout=10)
    stream = TlsStream(connection, context, server_side=False, server_hostname=address[0])
    stream.handshake()
    return stream


def _closes_without_answering(connection: socket.socket) -> bool:
    """Whether the peer ends the connection (within the socket's timeout) sending no frame."""
    received = b""
    try:
        while chunk := connection.recv(4096):
            received += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    # At most a TLS alert record (type 0x15), never a frame of ours.
    return not received or received[:1] == b"\x15"


def test_the_tcp_data_plane_speaks_tls_to_allowed_callers_only(secure_stack: Stack, pki: Pki) -> None:
    address = _tcp_data_plane(secure_stack, pki)
    request = sut_agent_pb2.StreamInferRequest(batch=sut_agent_pb2.QueryBatch(sample_ids=[7], sample_indices=[0]))

    # Plaintext: the bytes are no TLS handshake; the agent closes the connection.
    with socket.create_connection(address, timeout=10) as plain:
        write_frame(plain, request.SerializeToString())
        assert _closes_without_answering(plain)

    # A certificate from the CA whose name is not allowed: closed after the handshake.
    intruder = _tls_stream(address, pki.intruder, pki.ca.cert)
    try:
        with pytest.raises(OSError):
            write_frame(intruder, request.SerializeToString())
            if read_frame(intruder) is None:
                raise ConnectionResetError("closed")
    finally:
        intruder.close()

    # The controller's identity: answered, then an empty frame ends the requests.
    allowed = _tls_stream(address, pki.controller, pki.ca.cert)
    try:
        write_frame(allowed, request.SerializeToString())
        answered: list[int] = []
        while 7 not in answered:
            frame = read_frame(allowed)
            assert frame is not None
            answered += sut_agent_pb2.StreamInferResponse.FromString(frame).batch.sample_ids
        write_frame(allowed, b"")
        assert read_frame(allowed) is None
    finally:
        allowed.close()


# --- the pieces ----------------------------------------------------------------------------------


def test_tls_stream_carries_both_directions_at_once(pki: Pki) -> None:
    """One thread writing while another reads, on both ends (what ssl.SSLSocket cannot do safely)."""
    server_context = ssl_server_context(
        TlsSettings(cert=pki.controller.cert, key=pki.controller.key, ca=pki.ca.cert, client_auth=True)
    )
    client_context = ssl_client_context(TlsSettings(cert=pki.intruder.cert, key=pki.intruder.key, ca=pki.ca.cert))
    assert server_context is not None and client_context is not None
    left, right = socket.socketpair()
    server = TlsStream(left, server_context, server_side=True)
    client = TlsStream(right, client_context, server_side=False, server_hostname="localhost")
    handshake = threading.Thread(target=server.handshake)
    handshake.start()
    client.handshake()
    handshake.join()
    assert "intruder" in str(server.getpeercert())
    payloads = [os.urandom(size) for size in (1, 100, 70_000, 1_000_000) * 8]
    received: dict[str, list[bytes]] = {"server": [], "client": []}

    def pump(stream: TlsStream, name: str) -> None:
        for payload in payloads:
            write_frame(stream, payload)
        write_frame(stream, b"")

    def drain(stream: TlsStream, name: str) -> None:
        while frame := read_frame(stream):
            received[name].append(frame)

    threads = [
        threading.Thread(target=pump, args=(server, "server")),
        threading.Thread(target=pump, args=(client, "client")),
        threading.Thread(target=drain, args=(server, "server")),
        threading.Thread(target=drain, args=(client, "client")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert received["server"] == payloads and received["client"] == payloads
    left.close()
    right.close()


def test_tls_settings_come_from_the_environment_with_per_service_callers(pki: Pki) -> None:
    env = pki.controller.env(client_auth="true", allowed_clients="controller, loadgen")
    shared = TlsSettings.load(environ=env)
    assert shared.enabled and shared.client_auth and shared.allowed_clients == ("controller", "loadgen")
    sut = TlsSettings.load("SUT", environ={**env, "MECBENCH_SUT_TLS_ALLOWED_CLIENTS": "loadgen"})
    assert sut.allowed_clients == ("loadgen",) and sut.cert == pki.controller.cert
    assert not TlsSettings.load(environ={}).enabled


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"MECBENCH_TLS_KEY": ""}, "must be set together"),
        ({"MECBENCH_TLS_CA": "/nonexistent/ca.pem"}, "no such file"),
        ({"MECBENCH_TLS_CLIENT_AUTH": "false"}, "ALLOWED_CLIENTS needs"),
    ],
)
def test_inconsistent_tls_settings_stop_start_up(pki: Pki, change: dict[str, str], message: str) -> None:
    env = pki.controller.env(client_auth="true", allowed_clients="controller") | change
    with pytest.raises(SettingsError, match=message):
        TlsSettings.load(environ=env)
