"""Health probes of an external server: one attempt each, a short reason when it is unhealthy.

Every probe opens a fresh connection: a pooled keep-alive connection could outlive a restarted
or hung server and make a probe pass (or fail) for the wrong reason.
"""

from __future__ import annotations

import errno
import socket

import grpc
import urllib3
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sut_agent.external.profiles import Probe

_MAX_REASON = 200


def probe_once(probe: Probe) -> str | None:
    """None if the server is healthy, else why not ("connection refused", "HTTP 503", "NOT_SERVING")."""
    if probe.kind == "http":
        return _probe_http(probe)
    if probe.kind == "tcp":
        return _probe_tcp(probe)
    if probe.kind == "grpc":
        return _probe_grpc(probe)
    return f"unknown probe kind {probe.kind!r}"


def _probe_http(probe: Probe) -> str | None:
    pool = urllib3.PoolManager(num_pools=1, retries=False, timeout=urllib3.Timeout(total=probe.timeout_s))
    try:
        response = pool.request("GET", probe.target, redirect=False, preload_content=False)
    except urllib3.exceptions.HTTPError as error:
        return _http_error_reason(error)
    finally:
        pool.clear()
    try:
        if 200 <= response.status < 400:
            return None
        return f"HTTP {response.status}"
    finally:
        response.release_conn()
        response.close()


def _http_error_reason(error: urllib3.exceptions.HTTPError) -> str:
    # Before TimeoutError: urllib3 makes NewConnectionError a subclass of ConnectTimeoutError.
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        cause = error.__cause__ or error.__context__
        if isinstance(cause, OSError):
            return _os_error_reason(cause)
        return _short(str(error))
    if isinstance(error, urllib3.exceptions.TimeoutError):
        return "timed out"
    if isinstance(error, urllib3.exceptions.ProtocolError):
        return "connection closed without a response"
    return _short(f"{type(error).__name__}: {error}")


def _probe_tcp(probe: Probe) -> str | None:
    host, port = _split_host_port(probe.target)
    try:
        with socket.create_connection((host, port), timeout=probe.timeout_s):
            return None
    except OSError as error:
        return _os_error_reason(error)


def _probe_grpc(probe: Probe) -> str | None:
    with grpc.insecure_channel(probe.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=probe.grpc_service), timeout=probe.timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            # The server answered, it just has no health service: it is up.
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "timed out"
            details = str(error.details() or "")
            if code == grpc.StatusCode.UNAVAILABLE and "refused" in details.lower():
                return "connection refused"
            if code == grpc.StatusCode.NOT_FOUND:
                return f"unknown health service {probe.grpc_service!r}"
            return _short(f"{code.name}: {details}")
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _split_host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _os_error_reason(error: OSError) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if error.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return _short(f"cannot resolve host: {error.strerror}")
    return _short(error.strerror or str(error))


def _short(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."
