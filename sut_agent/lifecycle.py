"""The backend's lifecycle behind Start, Stop and GetStatus: plain Python, no gRPC."""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from mecbench.core.errors import FailedPrecondition, InvalidArgument, MecbenchError
from mecbench.core.logging import get_logger
from mecbench.core.sut_config import validate_config
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends import create_backend
from sut_agent.backends.base import Backend
from sut_agent.members import MemberManager
from sut_agent.settings import SutAgentSettings
from sut_agent.stats import SutStatsRecorder

log = get_logger("sut_agent.lifecycle")


class TcpListener(Protocol):
    """What the manager knows of the TCP data plane (sut_agent.tcp_dataplane imports this
    module, not the other way round)."""

    @property
    def accepted(self) -> int: ...


class BackendManager:
    """Holds the one running backend, its config and state, and the server-side stats."""

    def __init__(self, settings: SutAgentSettings) -> None:
        if settings.server_log_dir is None:
            settings = dataclasses.replace(settings, server_log_dir=Path(tempfile.mkdtemp(prefix="mecbench-sut-")))
        self.settings = settings
        # This agent's member of a cluster SUT (StartMember), if it is one.
        self.members = MemberManager(settings)
        self.stats = SutStatsRecorder()
        self._lock = threading.Lock()  # serialises Start and Stop
        self.backend: Backend | None = None
        self._state = sut_agent_pb2.BACKEND_STATE_STOPPED
        self._config = sut_agent_pb2.SutConfig()
        self._message = ""
        self._started_at_ns = 0
        self.open_streams = 0
        # Set by the server when the plain-TCP data plane listens; the port is in the status.
        # The plain-TCP data plane the server starts beside gRPC, and its port for SutStatus (0: none).
        self.tcp_data_plane: TcpListener | None = None
        self.tcp_data_plane_port = 0

    def server_metrics(self, reset: bool = False) -> dict[str, float]:
        """The running server's own metrics (external servers with a metrics page), else {}."""
        backend = self.backend
        return backend.server_metrics(reset) if backend is not None else {}

    def ready_backend(self) -> Backend:
        """The backend to submit to; FAILED_PRECONDITION when none is ready."""
        backend = self.backend
        if backend is None:
            raise FailedPrecondition(f"backend is not ready ({self.state_name()}): call Start first")
        return backend

    def state_name(self) -> str:
        return sut_agent_pb2.BackendState.Name(self._state).removeprefix("BACKEND_STATE_")

    def server_log_size(self) -> int:
        try:
            return self.settings.server_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_server_log(self, offset: int, limit: int = 0) -> bytes:
        try:
            with self.settings.server_log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read(limit if limit > 0 else -1)
        except FileNotFoundError:
            return b""

    def start(self, config: sut_agent_pb2.SutConfig, restart: bool) -> sut_agent_pb2.SutStatus:
        validate_config(config, env_allowlist=self.settings.env_allowlist).raise_if_any()
        with self._lock:
            if self.backend is not None:
                if config == self._config and not restart:
                    return self.status()
                if not restart:
                    raise FailedPrecondition("a backend with a different config is running: set restart to replace it")
            previous_state = self._state
            self._state = sut_agent_pb2.BACKEND_STATE_STARTING
            try:
                # A cluster's head serves once its runtime reports every member.
                cluster_values = self.members.wait_joined(config) if config.HasField("cluster") else None
                # Built before the running one stops: a config that fails to load leaves it serving.
                backend = create_backend(config, self.settings, cluster_values)
            except InvalidArgument:  # a request the backend refused: nothing changed
                self._state = previous_state
                raise
            except Exception as exc:  # the server did not come up: the status says why
                self._state = previous_state if self.backend is not None else sut_agent_pb2.BACKEND_STATE_FAILED
                self._message = f"start failed: {exc}" if isinstance(exc, MecbenchError) else (
                    f"start failed: {type(exc).__name__}: {exc}"
                )
                raise
            old, self.backend = self.backend, backend
            self._config = sut_agent_pb2.SutConfig()
            self._config.CopyFrom(config)
            self._state = sut_agent_pb2.BACKEND_STATE_READY
            self._message = ""
            self._started_at_ns = time.time_ns()
            self.stats.reset()
        if old is not None:
            old.close()
        log.info("backend_started", backend=backend.name, replaced=old is not None)
        return self.status()

    def stop(self) -> sut_agent_pb2.SutStatus:
        with self._lock:
            backend, self.backend = self.backend, None
            self._state = sut_agent_pb2.BACKEND_STATE_STOPPED
        if backend is not None:
            backend.close()
            log.info("backend_stopped", backend=backend.name)
        return self.status()

    def status(self) -> sut_agent_pb2.SutStatus:
        backend = self.backend
        state, message = self._state, self._message
        failure = backend.failure() if backend is not None else None
        if failure is not None:
            # The server died or hangs under a running backend: say so until it is restarted.
            state, message = sut_agent_pb2.BACKEND_STATE_FAILED, failure
        member = self.members.status()
        member_failure = self.members.failure()
        if backend is not None and member_failure is not None and failure is None:
            # The cluster's head process under the server died: the server spans nothing any more.
            state, message = sut_agent_pb2.BACKEND_STATE_FAILED, f"cluster member {member.name if member else ''}: " \
                f"{member_failure}"
        status = sut_agent_pb2.SutStatus(
            state=state,
            backend=backend.name if backend is not None else "",
            message=message,
            in_flight=max(self.stats.in_flight, 0),
            open_streams=self.open_streams,
            tcp_data_plane_port=self.tcp_data_plane_port,
            server_log_size=self.server_log_size(),
        )
        if member is not None:
            status.member.CopyFrom(member)
        if backend is not None:
            info = backend.server_info()
            status.server_pid, status.server_endpoint, status.server_log_start = info.pid, info.endpoint, info.log_start
            status.server_type = info.server_type
            status.config.CopyFrom(self._config)
            started = Timestamp()
            started.FromNanoseconds(self._started_at_ns)
            status.started_at.CopyFrom(started)
        return status

    def close(self) -> None:
        self.stop()
        self.members.stop()
