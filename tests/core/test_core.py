"""The shared core: error mapping, settings from the environment, server bootstrap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from mecbench.core.errors import InvalidArgument, NotFound, Violations
from mecbench.core.server import build_server
from mecbench.core.settings import SettingsError, from_env
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc


class FailingController(controller_pb2_grpc.ControllerServicer):
    def GetRun(self, request: controller_pb2.GetRunRequest, context: grpc.ServicerContext) -> controller_pb2.GetRunResponse:
        if request.run_id == "bad":
            violations = Violations()
            violations.add("run_id", "is bad")
            violations.add("other.field", "also bad")
            violations.raise_if_any()
        if request.run_id == "missing":
            raise NotFound("run 'missing' not found")
        raise RuntimeError("secret internal detail /etc/passwd")

    def WatchRun(self, request: controller_pb2.WatchRunRequest, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        yield controller_pb2.WatchRunResponse(message="first")
        raise InvalidArgument("stream broke", field="run_id")


@pytest.fixture(scope="module")
def stub():  # type: ignore[no-untyped-def]
    running = build_server(
        "127.0.0.1:0",
        lambda s: controller_pb2_grpc.add_ControllerServicer_to_server(FailingController(), s),
        ["mecbench.v1.Controller"],
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield controller_pb2_grpc.ControllerStub(channel), channel
    channel.close()
    running.stop(0)


def test_field_violations_become_bad_request_details(stub) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    with pytest.raises(grpc.RpcError) as info:
        client.GetRun(controller_pb2.GetRunRequest(run_id="bad"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None and status.code == code_pb2.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("run_id", "is bad"), ("other.field", "also bad")
    ]


def test_domain_errors_map_to_codes(stub) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    with pytest.raises(grpc.RpcError) as info:
        client.GetRun(controller_pb2.GetRunRequest(run_id="missing"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in info.value.details()


def test_unknown_errors_are_internal_without_details(stub) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    with pytest.raises(grpc.RpcError) as info:
        client.GetRun(controller_pb2.GetRunRequest(run_id="boom"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details() and "Traceback" not in info.value.details()
    assert "incident" in info.value.details()


def test_streaming_errors_are_mapped_after_messages(stub) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for event in client.WatchRun(controller_pb2.WatchRunRequest(run_id="x")):
            received.append(event.message)
    assert received == ["first"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unimplemented_method_stays_unimplemented(stub) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    with pytest.raises(grpc.RpcError) as info:
        client.ListNodes(controller_pb2.ListNodesRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_reflection(stub) -> None:  # type: ignore[no-untyped-def]
    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mecbench.v1.Controller"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"mecbench.v1.Controller", "grpc.health.v1.Health"} <= names


@dataclass
class ExampleSettings:
    workers: int = 4
    ratio: float = 0.5
    enabled: bool = False
    name: str = "x"
    root: Path = Path("/tmp")
    patterns: tuple[str, ...] = ("veth*",)


def test_settings_from_env_convert_by_type() -> None:
    env = {
        "MECBENCH_T_WORKERS": "16", "MECBENCH_T_RATIO": "0.25", "MECBENCH_T_ENABLED": "true",
        "MECBENCH_T_ROOT": "/srv", "MECBENCH_T_PATTERNS": "veth*, mec*", "OTHER": "1",
    }
    settings = from_env(ExampleSettings, "MECBENCH_T_", env, name="override")
    assert settings == ExampleSettings(16, 0.25, True, "override", Path("/srv"), ("veth*", "mec*"))


def test_settings_reject_bad_values_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="MECBENCH_T_WORKERS"):
        from_env(ExampleSettings, "MECBENCH_T_", {"MECBENCH_T_WORKERS": "many"})
    with pytest.raises(SettingsError, match="MECBENCH_T_ENABLED"):
        from_env(ExampleSettings, "MECBENCH_T_", {"MECBENCH_T_ENABLED": "perhaps"})


def test_scenario_enum_has_zero_unspecified() -> None:
    assert common_pb2.Scenario.Name(0) == "SCENARIO_UNSPECIFIED"


def test_every_log_line_of_a_service_is_json_with_its_logger_name() -> None:
    """structlog's lines and the standard library's (kubernetes, urllib3, the SDK) come out in one
    format, each naming its logger."""
    import json as json_module
    import subprocess
    import sys

    program = (
        "import logging\n"
        "from mecbench.core.logging import configure_logging, get_logger\n"
        "log = get_logger('mecbench.test.module')\n"
        "configure_logging('info', json_output=True)\n"
        "log.info('from_structlog', run_id='r1')\n"
        "logging.getLogger('urllib3.connectionpool').warning('retrying %s', 'x')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    lines = [json_module.loads(line) for line in result.stderr.splitlines()]
    assert [(line["logger"], line["event"], line["level"]) for line in lines] == [
        ("mecbench.test.module", "from_structlog", "info"),
        ("urllib3.connectionpool", "retrying x", "warning"),
    ]
    assert all("timestamp" in line for line in lines)


def test_bad_settings_stop_a_service_with_one_line_naming_every_problem(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {
        "PATH": "/usr/bin:/bin", "MECBENCH_CONTROLLER_DATA_DIR": str(tmp_path / "data"),
        "MECBENCH_CONTROLLER_BACKEND": "docker", "MECBENCH_CONTROLLER_TOPOLOGY": "mesh",
        "MECBENCH_CONTROLLER_MAX_WORKERS": "0", "MECBENCH_CONTROLLER_TOPOLOGY_SLOT": "x",
    }
    result = subprocess.run([sys.executable, "-m", "mecbench", "controller", "--listen", "127.0.0.1:0"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for expected in ("MECBENCH_CONTROLLER_BACKEND='docker': expected one of local, kubernetes",
                     "MECBENCH_CONTROLLER_TOPOLOGY='mesh': expected one of loopback, netns",
                     "MECBENCH_CONTROLLER_MAX_WORKERS=0: must be at least 1",
                     "MECBENCH_CONTROLLER_TOPOLOGY_SLOT='x': expected int"):
        assert expected in lines[0]
    assert not (tmp_path / "data").exists()
