"""Shared fixtures. Servers are real and bind port 0 on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mecbench.core import codec
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
    violations = {v.field: v.description for v in codec.field_violations(error)}
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


# Test tiers (pyproject's markers): `pytest -m "not slow and not root and not gpu and not cluster"` is
# the quick tier (scripts/test --quick); CI runs everything. Files are marked here by what they
# need, so a new test in them is tiered without remembering to.
GPU_FILES = {"tests/node_agent/test_gpus.py"}
# Whole stacks (controller, agents, LoadGen runs, S3 outages) in every test of these files: the
# full tier's; their logic is also covered by fast tests (fakes, units) in the quick tier.
SLOW_FILES = {
    "tests/controller/test_store_outage.py", "tests/store/test_spool.py", "tests/cli/test_commands.py",
    "tests/cli/test_cli.py", "tests/report/test_report.py", "tests/sdk/test_client.py",
    "tests/sdk/test_async_client.py", "tests/controller/test_experiments.py", "tests/controller/test_runs.py",
    "tests/controller/test_buf_curl.py", "tests/reliability/test_limits.py", "tests/security/test_auth.py",
    "tests/security/test_tls.py", "tests/core/test_metrics.py", "tests/loadgen_agent/test_agent.py",
    "tests/controller/test_edge_groups.py", "tests/controller/test_blobs.py",
    "tests/controller/test_cluster_sut.py",
}
CLUSTER_FILES = {"tests/kubernetes/test_real_api.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        path = Path(str(item.path)).relative_to(root).as_posix()
        if any(m.name == "skipif" and "needs root" in str(m.kwargs.get("reason", "")) for m in item.iter_markers()):
            item.add_marker(pytest.mark.root)
        if path in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if path in GPU_FILES:
            item.add_marker(pytest.mark.gpu)
        if path in CLUSTER_FILES:
            item.add_marker(pytest.mark.cluster)


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
