"""Helpers shared by the SDK tests: tiny spec files, a stand-in Controller server that records
what it receives (metadata, call counts) and can fail on purpose, and a self-signed certificate."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core.server import RunningServer
from mecbench.v1 import common_pb2, controller_pb2

TINY_SPEC = """
experiment_id: {experiment_id}
skip_calibration: true
sut:
  synthetic: {{distribution: SERVICE_TIME_DISTRIBUTION_CONSTANT, mean: 0.001s}}
dataset:
  synthetic: {{sample_count: 64, shape: [16], data_type: DATA_TYPE_FLOAT32}}
settings:
  min_duration: {duration}
  min_query_count: 100
  single_stream_expected_latency: 0.001s
  skip_mlperf_defaults: true
sweep:
  scenarios: [SCENARIO_SINGLE_STREAM]
  clients: [{clients}]
"""


def spec_file(directory: Path, experiment_id: str, clients: str = "1, 2", duration: str = "0.3s") -> Path:
    """A YAML experiment of short SingleStream points against a 1 ms synthetic SUT."""
    path = directory / f"{experiment_id}.yaml"
    path.write_text(TINY_SPEC.format(experiment_id=experiment_id, clients=clients, duration=duration))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def controller_later(port: int, data_dir: Path, delay_s: float) -> tuple[threading.Thread, list[RunningServer]]:
    """A real controller that starts listening on `port` after `delay_s`, from a thread."""
    started: list[RunningServer] = []

    def start() -> None:
        threading.Event().wait(delay_s)
        settings = ControllerSettings.load(data_dir=data_dir)
        server, _ = create_server(f"127.0.0.1:{port}", settings, app=ControllerApp(settings))
        started.append(server)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread, started


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for localhost and 127.0.0.1, made with openssl."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )
    return cert, key


@dataclass
class FakeController:
    """A gRPC server offering a few Controller methods, to see what a client sends and how it
    reacts to failures a real controller cannot be made to produce on demand.

    GetRun answers UNAVAILABLE `get_run_failures` times, then an empty Run with the id asked for;
    StartRun always answers UNAVAILABLE; WatchRun sends one RUNNING event and breaks with
    UNAVAILABLE on its first call, then sends a stale event (a minute old), the current state
    and SUCCEEDED.
    """

    credentials: grpc.ServerCredentials | None = None
    get_run_failures: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    metadata: list[dict[str, str]] = field(default_factory=list)
    address: str = ""

    def __post_init__(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((self._handlers(),))
        bind = "127.0.0.1:0"
        port = (
            self._server.add_secure_port(bind, self.credentials)
            if self.credentials is not None
            else self._server.add_insecure_port(bind)
        )
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)

    def _seen(self, method: str, context: grpc.ServicerContext) -> int:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.metadata.append({key: value for key, value in context.invocation_metadata()})
        return self.calls[method]

    def _get_run(self, request: controller_pb2.GetRunRequest, context: grpc.ServicerContext) -> controller_pb2.GetRunResponse:
        if self._seen("GetRun", context) <= self.get_run_failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return controller_pb2.GetRunResponse(run=controller_pb2.Run(run_id=request.run_id))

    def _start_run(self, request: controller_pb2.StartRunRequest, context: grpc.ServicerContext) -> controller_pb2.StartRunResponse:
        self._seen("StartRun", context)
        context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost")
        raise AssertionError("abort raises")

    def _watch_run(self, request: controller_pb2.WatchRunRequest,
                   context: grpc.ServicerContext) -> Iterator[controller_pb2.WatchRunResponse]:
        first = self._seen("WatchRun", context) == 1
        running = controller_pb2.Run(run_id=request.run_id, state=common_pb2.RUN_STATE_RUNNING)
        if first:
            yield controller_pb2.WatchRunResponse(time=_now(), state=running.state, message="running", run=running)
            context.abort(grpc.StatusCode.UNAVAILABLE, "controller restarting")
        stale = _now()
        stale.seconds -= 60
        yield controller_pb2.WatchRunResponse(time=stale, state=running.state, message="stale", run=running)
        yield controller_pb2.WatchRunResponse(time=_now(), state=running.state, message="current state", run=running)
        done = controller_pb2.Run(run_id=request.run_id, state=common_pb2.RUN_STATE_SUCCEEDED)
        yield controller_pb2.WatchRunResponse(time=_now(), state=done.state, message="succeeded", run=done)

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "mecbench.v1.Controller",
            {
                "GetRun": grpc.unary_unary_rpc_method_handler(
                    self._get_run,
                    request_deserializer=controller_pb2.GetRunRequest.FromString,
                    response_serializer=controller_pb2.GetRunResponse.SerializeToString,
                ),
                "StartRun": grpc.unary_unary_rpc_method_handler(
                    self._start_run,
                    request_deserializer=controller_pb2.StartRunRequest.FromString,
                    response_serializer=controller_pb2.StartRunResponse.SerializeToString,
                ),
                "WatchRun": grpc.unary_stream_rpc_method_handler(
                    self._watch_run,
                    request_deserializer=controller_pb2.WatchRunRequest.FromString,
                    response_serializer=controller_pb2.WatchRunResponse.SerializeToString,
                ),
            },
        )


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def tls_fake(directory: Path) -> tuple[FakeController, Path]:
    """A FakeController serving TLS with a fresh self-signed certificate; (server, CA file)."""
    cert, key = self_signed_certificate(directory)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    return FakeController(credentials=credentials), cert
