"""Shared fixtures. Servers are real and bind port 0 on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mecbench.core.channels import open_channel, wait_until_serving
from mecbench.core.logging import configure_logging
from tests.s3server import S3Server

configure_logging(level=os.environ.get("MECBENCH_TEST_LOG_LEVEL", "warning"), json_output=True)

# The tests' operator lets requests name local datasets and labels under the temporary directory
# (where every test makes its files); services the tests start inherit this. tests/security
# starts services with other roots, or none, to show what lies outside is refused.
TEST_FILE_ROOT = tempfile.gettempdir()
os.environ.setdefault("MECBENCH_LOADGEN_DATASET_ROOTS", TEST_FILE_ROOT)
os.environ.setdefault("MECBENCH_CONTROLLER_LABELS_ROOTS", TEST_FILE_ROOT)


def is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not is_root(), reason="needs root for network namespaces and qdiscs")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on loopback for the whole session (started on first use, ~5 s)."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of an INVALID_ARGUMENT error, field to
    description, in the order the server reported them."""
    status = rpc_status.from_call(error)
    assert status is not None
    violations: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations |= {v.field: v.description for v in bad_request.field_violations}
    assert violations, f"no field violations in: {error}"
    return violations


def start_service_process(service: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`mecbench SERVICE --listen 127.0.0.1:0` as a child process, as an operator starts it, with
    `env` over this environment; (process, address) once it serves gRPC health."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mecbench", service, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("listening on "):
            address = line.removeprefix("listening on ").strip()
            with open_channel(address) as channel:
                wait_until_serving(channel, timeout=30)
            return process, address
    raise AssertionError(f"{service} did not start")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reliability figures the tests reported (tests/numbers.py)."""
    from tests.numbers import REPORTED

    if not REPORTED:
        return
    terminalreporter.section("MECBench reliability figures")
    for section, lines in REPORTED.items():
        terminalreporter.write_line(f"{section}:")
        for line in lines:
            terminalreporter.write_line(f"  {line}")
