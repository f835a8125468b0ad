"""In-memory fakes of the controller's agents, for testing its run state machine in milliseconds.

A fake, not a mock: the controller's real code (AgentPool, RunManager, ExperimentManager, the
registry, the spool, the store) talks real gRPC on loopback to servicers that keep the agents'
protocol (Start/GetStatus of a SUT agent; OpenSession, a streamed RunTest of started, progress,
log chunks and finished, CancelTest of a LoadGen agent) but run no LoadGen and no server. What
a test is scripted by `Script`: each test's verdict from its settings, how long it runs, whether
it hangs until cancelled. An agent "dies" when the test kills it: its gRPC server stops and the
backend reports it gone, as the local backend does for a process killed with SIGKILL.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from controller.backends.base import AgentHandle, AgentKind, DeploymentBackend
from mecbench.core import durations
from mecbench.core.server import RunningServer, build_server
from mecbench.core.tls import TlsSettings
from mecbench.v1 import (
    common_pb2,
    loadgen_agent_pb2,
    loadgen_agent_pb2_grpc,
    sut_agent_pb2,
    sut_agent_pb2_grpc,
)

SUMMARY = "mlperf_log_summary.txt"


@dataclass
class Script:
    """How the fake LoadGen agents behave. `verdict(settings)` says whether LoadGen would judge a
    test VALID; `progress_events` progress events come `step_s` apart; `hang` makes a test run
    until it is cancelled."""

    verdict: Callable[[common_pb2.LoadGenSettings], bool] = lambda _settings: True
    progress_events: int = 3
    step_s: float = 0.01
    hang: bool = False
    tests: list[loadgen_agent_pb2.RunTestRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)


class FakeSutAgent(sut_agent_pb2_grpc.SutAgentServicer):
    def __init__(self) -> None:
        self.config = sut_agent_pb2.SutConfig()
        self.state = sut_agent_pb2.BACKEND_STATE_STOPPED

    def Start(self, request: sut_agent_pb2.StartRequest, context: grpc.ServicerContext) -> sut_agent_pb2.StartResponse:
        self.config.CopyFrom(request.config)
        self.state = sut_agent_pb2.BACKEND_STATE_READY
        return sut_agent_pb2.StartResponse(status=self._status())

    def Stop(self, request: sut_agent_pb2.StopRequest, context: grpc.ServicerContext) -> sut_agent_pb2.StopResponse:
        self.state = sut_agent_pb2.BACKEND_STATE_STOPPED
        return sut_agent_pb2.StopResponse()

    def GetStatus(
        self, request: sut_agent_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.GetStatusResponse:
        return sut_agent_pb2.GetStatusResponse(status=self._status())

    def GetStats(
        self, request: sut_agent_pb2.GetStatsRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.GetStatsResponse:
        return sut_agent_pb2.GetStatsResponse()

    def _status(self) -> sut_agent_pb2.SutStatus:
        return sut_agent_pb2.SutStatus(state=self.state, backend="fake", config=self.config)


class FakeLoadGenAgent(loadgen_agent_pb2_grpc.LoadGenAgentServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self._ids = itertools.count(1)

    def OpenSession(
        self, request: loadgen_agent_pb2.OpenSessionRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.OpenSessionResponse:
        session = loadgen_agent_pb2.Session(
            session_id=f"fake-{next(self._ids)}", state=loadgen_agent_pb2.SESSION_STATE_IDLE,
            sut_address=request.sut_address, label=request.label, owner=request.owner,
        )
        return loadgen_agent_pb2.OpenSessionResponse(session=session)

    def CloseSession(
        self, request: loadgen_agent_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.CloseSessionResponse:
        return loadgen_agent_pb2.CloseSessionResponse()

    def CancelTest(
        self, request: loadgen_agent_pb2.CancelTestRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.CancelTestResponse:
        self.script.cancelled.set()
        return loadgen_agent_pb2.CancelTestResponse(was_running=True)

    def RunTest(
        self, request: loadgen_agent_pb2.RunTestRequest, context: grpc.ServicerContext
    ) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
        script = self.script
        script.tests.append(request)
        settings = request.settings
        qps = settings.server_target_qps or 100.0
        yield loadgen_agent_pb2.RunTestResponse(test_id=request.test_id, started=loadgen_agent_pb2.TestStarted())
        script.started.set()
        done = 0
        for step in itertools.count():
            if script.cancelled.is_set() or (not script.hang and step >= script.progress_events):
                break
            time.sleep(script.step_s)
            done += int(qps * script.step_s) or 1
            progress = loadgen_agent_pb2.TestProgress(live_qps=qps, samples_completed=done)
            yield loadgen_agent_pb2.RunTestResponse(test_id=request.test_id, progress=progress)
        cancelled = script.cancelled.is_set()
        valid = script.verdict(settings) and not cancelled
        summary = f"Result is : {'VALID' if valid else 'INVALID'}\n".encode()
        yield loadgen_agent_pb2.RunTestResponse(
            test_id=request.test_id, log_chunk=common_pb2.FileChunk(name=SUMMARY, data=summary, last=True)
        )
        result = common_pb2.TestResult(
            scenario=settings.scenario, valid=valid, performance_constraints_met=valid, query_count=done,
            samples_per_second=qps, completed_samples_per_second=qps,
        )
        result.latency.p99.CopyFrom(durations.from_seconds(0.001 if valid else 1.0))
        finished = loadgen_agent_pb2.TestFinished(result=result, cancelled=cancelled)
        yield loadgen_agent_pb2.RunTestResponse(test_id=request.test_id, finished=finished)


class FakeBackend(DeploymentBackend):
    """Agents as in-process gRPC servers on loopback ports."""

    name = "fake"

    def __init__(self, script: Script) -> None:
        self.script = script
        self._servers: dict[str, tuple[AgentHandle, RunningServer]] = {}
        self._lock = threading.Lock()
        self.started: list[str] = []

    def start_agent(
        self, kind: AgentKind, name: str, env: dict[str, str] | None = None, placement: str = ""
    ) -> AgentHandle:
        sut, loadgen = FakeSutAgent(), FakeLoadGenAgent(self.script)

        def register(server: grpc.Server) -> None:
            if kind == AgentKind.SUT:
                sut_agent_pb2_grpc.add_SutAgentServicer_to_server(sut, server)
            elif kind == AgentKind.LOADGEN:
                loadgen_agent_pb2_grpc.add_LoadGenAgentServicer_to_server(loadgen, server)
            else:
                raise AssertionError(f"the fakes have no {kind} agent")

        service = "mecbench.v1.SutAgent" if kind == AgentKind.SUT else "mecbench.v1.LoadGenAgent"
        running = build_server("127.0.0.1:0", register, [service], max_workers=16, tls=TlsSettings())
        handle = AgentHandle(name=name, kind=kind, address=running.address, node="fake-node", placement=placement)
        with self._lock:
            self._servers[name] = (handle, running)
            self.started.append(name)
        return handle

    def kill(self, name: str) -> None:
        """The agent's process died: its connections drop and the backend sees it gone."""
        with self._lock:
            _handle, running = self._servers.pop(name)
        running.stop(grace=0)

    def stop_agent(self, name: str) -> None:
        with self._lock:
            entry = self._servers.pop(name, None)
        if entry is not None:
            entry[1].stop(grace=0)

    def agents(self) -> list[AgentHandle]:
        with self._lock:
            return [handle for handle, _ in self._servers.values()]

    def is_alive(self, name: str) -> bool:
        with self._lock:
            return name in self._servers

    def close(self) -> None:
        for name in [handle.name for handle in self.agents()]:
            self.stop_agent(name)
