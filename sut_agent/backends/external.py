"""The external backend: queries go to an inference server through its own API.

The server is one the agent starts from a launch profile of its own configuration (then it is
probed until ready, watched while it serves, and stopped with the backend) or one already
running at `config.external.endpoint`. Its server type (mecbench.servers.registry) supplies
the protocol adapter. Before the backend reports ready, the model is prepared on the server
(loaded, pulled) and warm-up requests are sent, so the first measured query meets a warm server.

Samples queue in arrival order, in requests of up to `max_batch_size` samples; `max_concurrency`
worker threads each send one request at a time and block on its answer, which bounds the
requests in flight. A request that fails completes its samples with the error (LoadGen counts
them, the result says so); once the server has died, every sample fails at once with the reason.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mecbench.core import durations
from mecbench.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MecbenchError,
    PermissionDenied,
)
from mecbench.core.logging import get_logger
from mecbench.servers.base import InferenceResult, ServerError, ServerType
from mecbench.servers.errors import ErrorTally
from mecbench.servers.http import HttpClient
from mecbench.servers.metrics import ServerMetrics
from mecbench.servers.registry import load_server_type, server_types
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends.base import STOPPED_ERROR, Backend, Completion, CompletionCallback, ServerInfo
from sut_agent.external.process import ServerProcess
from sut_agent.external.profiles import (
    LaunchProfile,
    ProbeTemplate,
    allocate_ports,
    load_profiles,
    port_values,
    render,
)

log = get_logger("sut_agent.external")

FIELD = "config.external"
DEFAULT_CONCURRENCY = 32
DEFAULT_READY_TIMEOUT_S = 120.0
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class _Request:
    __slots__ = ("callback", "enqueued_ns", "ids", "payloads")

    def __init__(self, ids: list[int], payloads: list[bytes], callback: CompletionCallback, enqueued_ns: int) -> None:
        self.ids = ids
        self.payloads = payloads
        self.callback = callback
        self.enqueued_ns = enqueued_ns


def _request_profile(config: sut_agent_pb2.ExternalBackendConfig, allowed: bool) -> LaunchProfile:
    """A launch profile made from a request's own command line, where the operator allows that."""
    if not allowed:
        raise PermissionDenied(
            "this SUT agent starts only the servers of its launch profiles; its operator has not allowed "
            "commands in requests (MECBENCH_SUT_ALLOW_REQUEST_COMMANDS)"
        )
    if config.profile:
        raise InvalidArgument("set a profile or a command, not both", field=f"{FIELD}.command")
    return LaunchProfile(
        name="request",
        command=tuple(config.command),
        endpoint=config.endpoint or "http://{host}:{port}",
        ready=ProbeTemplate("tcp", "{host}:{port}"),
    )


def _profile(
    config: sut_agent_pb2.ExternalBackendConfig, profiles_path: Path | None, allow_request_commands: bool
) -> LaunchProfile | None:
    if config.command:
        return _request_profile(config, allow_request_commands)
    if not config.profile:
        return None
    if profiles_path is None:
        raise InvalidArgument(
            "this SUT agent has no launch profiles (MECBENCH_SUT_SERVER_PROFILES is not set)", field=f"{FIELD}.profile"
        )
    profiles = load_profiles(profiles_path)
    profile = profiles.get(config.profile)
    if profile is None:
        known = ", ".join(sorted(profiles)) or "none"
        raise InvalidArgument(
            f"no launch profile {config.profile!r}; this agent has: {known}", field=f"{FIELD}.profile"
        )
    return profile


def _server_type(name: str) -> type[ServerType]:
    if not name:
        raise InvalidArgument("must be set, here or in the launch profile", field=f"{FIELD}.server_type")
    server_type = load_server_type(name)
    if server_type is None:
        known = ", ".join(sorted(server_types()))
        raise InvalidArgument(f"unknown server type {name!r}; registered: {known}", field=f"{FIELD}.server_type")
    return server_type


class ExternalBackend(Backend):
    name = "external"

    def __init__(
        self, config: sut_agent_pb2.ExternalBackendConfig, *, profiles_path: Path | None, log_path: Path,
        model_dir: Path, allow_request_commands: bool = False, server_env: dict[str, str] | None = None,
        cluster_values: Mapping[str, str] | None = None,
    ) -> None:
        # `server_env` is the request's environment for the server, checked by validate_config
        # (reserved names, the operator's allowlist) before this is built.
        profile = _profile(config, profiles_path, allow_request_commands)
        server_class = _server_type(config.server_type or (profile.server_type if profile else ""))
        ready_timeout_s = durations.to_seconds(config.ready_timeout) or (
            profile.ready_timeout_s if profile else DEFAULT_READY_TIMEOUT_S
        )
        request_timeout_s = durations.to_seconds(config.request_timeout) or DEFAULT_REQUEST_TIMEOUT_S
        self._concurrency = config.max_concurrency or DEFAULT_CONCURRENCY
        self._batch_size = max(config.max_batch_size, 1)
        self._process: ServerProcess | None = None
        endpoint = config.endpoint
        if profile is not None:
            values = {
                "model": config.model,
                "model_dir": str(model_dir.resolve()),
                **port_values(allocate_ports(profile.ports, profile.host)),
                **(cluster_values or {}),
            }
            try:
                # The model name comes from the request: it must be a plain value.
                launch = render(profile, values, request_env=server_env or {})
            except InvalidArgument as exc:  # a request's value the profile puts on a command line
                raise InvalidArgument(
                    [FieldViolation(f"{FIELD}.{v.field}", v.description) for v in exc.violations]
                ) from None
            endpoint = endpoint or launch.endpoint
            self._process = ServerProcess(launch, profile, log_path, on_failure=self._on_server_failure)
            self._log_start = log_path.stat().st_size if log_path.exists() else 0
        elif not endpoint:
            raise InvalidArgument("set an endpoint, or a launch profile to start the server", field=f"{FIELD}.endpoint")
        self.endpoint = endpoint
        # Built (options checked) before anything starts: a bad option starts no server.
        self.server: ServerType = server_class(
            endpoint, config.model, dict(config.options), request_timeout_s, self._concurrency, f"{FIELD}.options"
        )
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._failure: str | None = None
        # Every kind of failed request is logged the first time it is seen, with its message.
        self.errors = ErrorTally("sut_agent.external")
        self._workers: list[threading.Thread] = []
        self._metrics: ServerMetrics | None = None
        try:
            deadline = time.monotonic() + ready_timeout_s
            if self._process is not None:
                self._process.start(ready_timeout_s)
            try:
                self.server.prepare(deadline)
            except ServerError as exc:
                raise FailedPrecondition(f"preparing model {config.model!r} on {endpoint} failed: {exc}") from None
            self._warm_up(config.warmup_requests or 1)
            self._metrics = self._server_metrics_reader(server_class, endpoint, request_timeout_s)
        except BaseException:
            self.server.close()
            if self._process is not None:
                self._process.stop()
            raise
        for index in range(self._concurrency):
            worker = threading.Thread(target=self._work, name=f"external-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        log.info(
            "external_server_ready", server_type=server_class.name, endpoint=endpoint, model=config.model,
            pid=self._process.pid if self._process else 0,
        )

    @staticmethod
    def _server_metrics_reader(
        server_class: type[ServerType], endpoint: str, timeout_s: float
    ) -> ServerMetrics | None:
        """A reader of the server's metrics page, counting from now (after the warm-up)."""
        if not server_class.metrics_path:
            return None
        try:
            reader = ServerMetrics(HttpClient(endpoint, min(timeout_s, 5.0), 1), server_class.metrics_path)
        except ValueError:
            return None  # not an HTTP endpoint
        reader.read(reset=True)
        if reader.error:
            log.info("server_metrics_unavailable", endpoint=endpoint, reason=reader.error)
        return reader

    def server_metrics(self, reset: bool = False) -> dict[str, float]:
        return self._metrics.read(reset) if self._metrics is not None else {}

    def _warm_up(self, requests: int) -> None:
        payloads = self.server.warmup_payloads()
        for _ in range(requests):
            try:
                self.server.infer(payloads, None)
            except Exception as exc:  # noqa: BLE001 - any failure of the warm-up refuses the start
                failure = self._process.failure() if self._process is not None else None
                raise FailedPrecondition(f"the warm-up request failed: {failure or exc}") from None

    def _on_server_failure(self, message: str) -> None:
        with self._lock:
            self._failure = message
        # Queued samples fail now rather than each waiting for a connection error.
        self._drain(message)

    def failure(self) -> str | None:
        return self._failure

    def server_info(self) -> ServerInfo:
        if self._process is None:
            return ServerInfo(0, self.endpoint, 0, self.server.name)
        return ServerInfo(self._process.pid, self.endpoint, self._log_start, self.server.name)

    def submit(
        self, sample_ids: Sequence[int], indices: Sequence[int], payloads: Sequence[bytes], on_done: CompletionCallback
    ) -> None:
        ids = list(sample_ids)
        with self._lock:
            refused = STOPPED_ERROR if self._closed else self._failure
        if refused is None and len(payloads) != len(ids):
            refused = "the external backend needs each sample's payload: the dataset travels with the queries"
        if refused is not None:
            on_done(Completion.failed(ids, refused))
            return
        now = time.monotonic_ns()
        size = self._batch_size
        data = list(payloads)
        for start in range(0, len(ids), size):
            self._queue.put(_Request(ids[start : start + size], data[start : start + size], on_done, now))

    def _work(self) -> None:
        server = self.server
        get = self._queue.get
        while True:
            request = get()
            if request is None:
                return
            ids = request.ids
            with self._lock:
                refused = STOPPED_ERROR if self._closed else self._failure
            if refused is not None:
                request.callback(Completion.failed(ids, refused))
                continue
            started = time.monotonic_ns()
            callback = request.callback

            def first_token(
                position: int, data: bytes, ids: list[int] = ids, callback: CompletionCallback = callback
            ) -> None:
                callback(Completion([ids[position]], [0], [0], [data], first_tokens=True))

            try:
                result: InferenceResult = server.infer(request.payloads, first_token)
            except Exception as exc:  # noqa: BLE001 - a failed request is failed samples, never a dead worker
                error = self._failure or (str(exc) if isinstance(exc, MecbenchError) else f"{exc}")
                error = error or type(exc).__name__
                self.errors.add(error, count=len(ids))
                callback(Completion.failed(ids, error))
                continue
            finished = time.monotonic_ns()
            count = len(ids)
            queue_us = [(started - request.enqueued_ns) // 1000] * count
            compute_us = [(finished - started) // 1000] * count
            callback(Completion(ids, queue_us, compute_us, result.outputs, None, 1, result.token_counts))

    def _drain(self, error: str) -> None:
        """Fail every queued request (the workers' end markers stay for them)."""
        kept = 0
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:
                kept += 1
            else:
                request.callback(Completion.failed(request.ids, error))
        for _ in range(kept):
            self._queue.put(None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._drain(STOPPED_ERROR)
        for _ in self._workers:
            self._queue.put(None)
        # Stopping the server ends the requests still in flight, so the workers finish quickly.
        if self._process is not None:
            self._process.stop()
        self.server.close()
        for worker in self._workers:
            worker.join(timeout=5)
        log.info("external_backend_closed", endpoint=self.endpoint)
