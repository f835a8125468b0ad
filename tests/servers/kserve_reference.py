"""Starts the KServe reference server (tests/servers/kserve_onnx_server.py: kserve's own ModelServer
serving one ONNX model) on free loopback ports, for tests of the KServe v2 adapters.

The server runs in .venv-kserve (scripts/setup makes it): kserve pins protobuf<7, MECBench needs 7.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import urllib3

REPO_ROOT = Path(__file__).resolve().parents[2]
KSERVE_PYTHON: Path = REPO_ROOT / ".venv-kserve" / "bin" / "python"
SERVER_SCRIPT = Path(__file__).resolve().with_name("kserve_onnx_server.py")


def free_port() -> int:
    """A loopback port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def kserve_available() -> bool:
    return KSERVE_PYTHON.exists()


@dataclass
class KServeReference:
    """A running reference server; stop() ends it."""

    model_name: str
    http_port: int
    grpc_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_seconds: float = field(default=0.0)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_kserve_reference(
    model_path: Path,
    model_name: str,
    *,
    log_path: Path | None = None,
    extra_args: list[str] | None = None,
    ready_timeout: float = 60.0,
    attempts: int = 3,
) -> KServeReference:
    """Start the reference server serving `model_path` as `model_name` on free loopback ports and
    wait until `GET /v2/health/ready` answers 200 and the gRPC port takes connections.

    Its stdout and stderr go to `log_path` (default: beside the model, `<model_name>.kserve.log`).
    A port taken between choosing and binding it makes the server exit; it is tried again on new
    ports up to `attempts` times."""
    if not kserve_available():
        raise RuntimeError(f"{KSERVE_PYTHON} not found: run scripts/setup, which makes .venv-kserve")
    log_path = log_path or model_path.with_name(f"{model_name}.kserve.log")
    last_error = ""
    for _ in range(attempts):
        reference = _launch(model_path, model_name, log_path, extra_args or [])
        try:
            _wait_until_ready(reference, ready_timeout)
        except _ExitedEarly as error:
            last_error = str(error)
            continue
        except BaseException:
            reference.stop()
            raise
        return reference
    raise RuntimeError(f"the KServe reference server did not start: {last_error}")


class _ExitedEarly(Exception):
    pass


def _launch(model_path: Path, model_name: str, log_path: Path, extra_args: list[str]) -> KServeReference:
    http_port, grpc_port = free_port(), free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    command = [
        str(KSERVE_PYTHON), str(SERVER_SCRIPT),
        "--model_name", model_name, "--model_path", str(model_path),
        "--http_port", str(http_port), "--grpc_port", str(grpc_port),
        *extra_args,
    ]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return KServeReference(model_name, http_port, grpc_port, process, log_path)


def _wait_until_ready(reference: KServeReference, timeout: float) -> None:
    started = time.monotonic()
    deadline = started + timeout
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=2.0))
    try:
        while True:
            if reference.process.poll() is not None:
                raise _ExitedEarly(f"exit status {reference.process.returncode}; log:\n{reference.log_tail()}")
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                if http.request("GET", f"{reference.http_url}/v2/health/ready").status == 200 and _accepts(reference.grpc_port):
                    reference.startup_seconds = time.monotonic() - started
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f} s; log:\n{reference.log_tail()}")
            time.sleep(0.05)
    finally:
        http.clear()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False
