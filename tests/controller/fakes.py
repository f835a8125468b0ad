"""In-memory fakes of the controller's agents, for testing its run state machine in milliseconds.

A fake, not a mock: the controller's real code (AgentPool, RunManager, ExperimentManager,
RunShaping, the registry, the spool, the store) calls these through the agent client interfaces
(controller/agent_clients.py) the gRPC clients implement, with no server and no socket. They keep
the agents' protocol: a SUT agent's Start/GetStatus; a LoadGen agent's sessions, a streamed
RunTest of started, progress, log chunks and finished, CancelTest; a node agent's shapings under
leases and its telemetry stream (no placements: the fake backend places no process). What a test
does is scripted by `Script`: each test's verdict from its settings, how long it runs, whether it
hangs until cancelled, a hook before every call.
An agent "dies" when the test kills it: the backend reports it gone, every call to it raises
Unavailable naming it, and a test it runs (or one whose SUT it is) breaks off, as with SIGKILL.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from controller.agent_clients import (
    QUICK_CALL_TIMEOUT_S,
    SLOW_CALL_TIMEOUT_S,
    AgentConnector,
    LoadGenAgentClient,
    NodeAgentClient,
    ReplyStream,
    SutAgentClient,
)
from controller.backends.base import AgentHandle, AgentKind, DeploymentBackend, ShapingPoint
from mecbench.core import durations
from mecbench.core.errors import FailedPrecondition, NotFound, Unavailable
from mecbench.v1 import common_pb2, loadgen_agent_pb2, node_agent_pb2, sut_agent_pb2

SUMMARY = "mlperf_log_summary.txt"
T = TypeVar("T")


@dataclass
class Script:
    """How the fake agents behave. `verdict(settings)` says whether LoadGen would judge a test
    VALID; `progress_events` progress events come `step_s` apart; `hang` makes a test run until
    it is cancelled; `before_call(agent, rpc)` runs before every call an agent takes (to inject a
    cancel or a death at an exact point)."""

    verdict: Callable[[common_pb2.LoadGenSettings], bool] = lambda _settings: True
    progress_events: int = 3
    step_s: float = 0.01
    hang: bool = False
    before_call: Callable[[str, str], None] = lambda _agent, _rpc: None
    tests: list[loadgen_agent_pb2.RunTestRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)


class FakeAgent:
    """One agent's process: what it holds, alive until the test kills it."""

    def __init__(self, handle: AgentHandle, backend: FakeBackend) -> None:
        self.handle = handle
        self.backend = backend
        self.alive = True
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def take(self, component: str, rpc: str) -> None:
        """A call arrives: the script's hook, then Unavailable if the agent is gone (as a refused
        connection reads through the codec)."""
        self.backend.script.before_call(self.handle.name, rpc)
        self.check(component)

    def check(self, component: str) -> None:
        if not self.alive:
            raise Unavailable(f"{component}: failed to connect to {self.handle.address} (the agent is gone)")


AgentT = TypeVar("AgentT", bound=FakeAgent)


class FakeClient(Generic[AgentT]):
    """A client of one fake agent; its errors name `component`, as a gRPC client's do."""

    def __init__(self, agent: AgentT, component: str) -> None:
        self.agent = agent
        self.component = component

    def close(self) -> None:
        """Nothing to close: no channel."""


class FakeStream(ReplyStream[T]):
    """Replies made by `produce(cancelled)`; `cancel` ends the stream quietly at its next reply."""

    def __init__(self, produce: Callable[[threading.Event], Iterable[T]]) -> None:
        self._produce = produce
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[T]:
        for reply in self._produce(self._cancelled):
            if self._cancelled.is_set():
                return
            yield reply

    def cancel(self) -> None:
        self._cancelled.set()


# --- SUT agents -----------------------------------------------------------------------------------


class FakeSutAgent(FakeAgent):
    def __init__(self, handle: AgentHandle, backend: FakeBackend) -> None:
        super().__init__(handle, backend)
        self.config = sut_agent_pb2.SutConfig()
        self.state = sut_agent_pb2.BACKEND_STATE_STOPPED


class FakeSutClient(FakeClient[FakeSutAgent], SutAgentClient):
    def start(self, request: sut_agent_pb2.StartRequest, timeout: float = SLOW_CALL_TIMEOUT_S) -> None:
        self.agent.take(self.component, "Start")
        self.agent.config.CopyFrom(request.config)
        self.agent.state = sut_agent_pb2.BACKEND_STATE_READY

    def stop(self, timeout: float = QUICK_CALL_TIMEOUT_S) -> None:
        self.agent.take(self.component, "Stop")
        self.agent.state = sut_agent_pb2.BACKEND_STATE_STOPPED

    def get_status(self, timeout: float = QUICK_CALL_TIMEOUT_S) -> sut_agent_pb2.SutStatus:
        self.agent.take(self.component, "GetStatus")
        return sut_agent_pb2.SutStatus(state=self.agent.state, backend="fake", config=self.agent.config)

    def get_stats(self, reset: bool) -> sut_agent_pb2.SutStats:
        self.agent.take(self.component, "GetStats")
        return sut_agent_pb2.SutStats()

    def get_server_log(self, request: sut_agent_pb2.GetServerLogRequest) -> ReplyStream[bytes]:
        self.agent.take(self.component, "GetServerLog")
        return FakeStream(lambda _cancelled: [])  # a synthetic backend runs no server process

    def start_member(self, request: sut_agent_pb2.StartMemberRequest, timeout: float) -> sut_agent_pb2.MemberStatus:
        self.agent.take(self.component, "StartMember")
        raise FailedPrecondition(f"{self.component}: the fakes run no cluster SUT")

    def stop_member(self) -> None:
        self.agent.take(self.component, "StopMember")

# --- LoadGen agents -------------------------------------------------------------------------------


class FakeLoadGenAgent(FakeAgent):
    def __init__(self, handle: AgentHandle, backend: FakeBackend) -> None:
        super().__init__(handle, backend)
        self.sessions: dict[str, loadgen_agent_pb2.Session] = {}

    def open_session(self, request: loadgen_agent_pb2.OpenSessionRequest) -> loadgen_agent_pb2.Session:
        session = loadgen_agent_pb2.Session(
            session_id=self.next_id("fake"), state=loadgen_agent_pb2.SESSION_STATE_IDLE,
            sut_address=request.sut_address, label=request.label, owner=request.owner,
        )
        with self.lock:
            self.sessions[session.session_id] = session
        return session

    def session(self, component: str, session_id: str) -> loadgen_agent_pb2.Session:
        with self.lock:
            session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"{component}: no session {session_id}")
        return session

    def run_test(
        self, request: loadgen_agent_pb2.RunTestRequest, component: str, cancelled: threading.Event
    ) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
        """LoadGen's test as the agent streams it: the SUT's or this agent's death breaks it off."""
        script = self.backend.script
        sut_address = self.session(component, request.session_id).sut_address
        script.tests.append(request)
        settings = request.settings
        qps = settings.server_target_qps or 100.0
        yield loadgen_agent_pb2.RunTestResponse(test_id=request.test_id, started=loadgen_agent_pb2.TestStarted())
        script.started.set()
        done = 0
        for step in itertools.count():
            if script.cancelled.is_set() or cancelled.is_set() or (not script.hang and step >= script.progress_events):
                break
            time.sleep(script.step_s)
            self.check(component)  # the agent died: its stream breaks
            if not self.backend.alive_at(sut_address):
                raise Unavailable(f"{component}: the data plane lost the SUT at {sut_address}")
            done += int(qps * script.step_s) or 1
            progress = loadgen_agent_pb2.TestProgress(live_qps=qps, samples_completed=done)
            yield loadgen_agent_pb2.RunTestResponse(test_id=request.test_id, progress=progress)
        was_cancelled = script.cancelled.is_set()
        valid = script.verdict(settings) and not was_cancelled
        summary = f"Result is : {'VALID' if valid else 'INVALID'}\n".encode()
        yield loadgen_agent_pb2.RunTestResponse(
            test_id=request.test_id, log_chunk=common_pb2.FileChunk(name=SUMMARY, data=summary, last=True)
        )
        result = common_pb2.TestResult(
            scenario=settings.scenario, valid=valid, performance_constraints_met=valid, query_count=done,
            samples_per_second=qps, completed_samples_per_second=qps,
        )
        result.latency.p99.CopyFrom(durations.from_seconds(0.001 if valid else 1.0))
        finished = loadgen_agent_pb2.TestFinished(result=result, cancelled=was_cancelled)
        yield loadgen_agent_pb2.RunTestResponse(test_id=request.test_id, finished=finished)


class FakeLoadGenClient(FakeClient[FakeLoadGenAgent], LoadGenAgentClient):
    def open_session(self, request: loadgen_agent_pb2.OpenSessionRequest) -> loadgen_agent_pb2.Session:
        self.agent.take(self.component, "OpenSession")
        return self.agent.open_session(request)

    def close_session(self, session_id: str) -> None:
        self.agent.take(self.component, "CloseSession")
        with self.agent.lock:
            self.agent.sessions.pop(session_id, None)

    def run_test(
        self, request: loadgen_agent_pb2.RunTestRequest, timeout: float, where: str = ""
    ) -> ReplyStream[loadgen_agent_pb2.RunTestResponse]:
        component = f"{self.component} ({where})" if where else self.component

        def produce(cancelled: threading.Event) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
            self.agent.take(component, "RunTest")
            yield from self.agent.run_test(request, component, cancelled)

        return FakeStream(produce)

    def cancel_test(self, session_id: str) -> bool:
        self.agent.take(self.component, "CancelTest")
        self.agent.session(self.component, session_id)
        self.agent.backend.script.cancelled.set()
        return True

# --- node agents ----------------------------------------------------------------------------------


class FakeNodeAgent(FakeAgent):
    def __init__(self, handle: AgentHandle, backend: FakeBackend) -> None:
        super().__init__(handle, backend)
        self.shapings: dict[str, node_agent_pb2.Shaping] = {}
        self.renewals = 0


class FakeNodeClient(FakeClient[FakeNodeAgent], NodeAgentClient):
    def get_node_info(self) -> common_pb2.NodeInfo:
        self.agent.take(self.component, "GetNodeInfo")
        return common_pb2.NodeInfo(name=self.agent.handle.node, supported_qdiscs=["netem"])

    # The fake backend places no process (its agents are no processes): the pool never asks.
    def place_process(self, request: node_agent_pb2.PlaceProcessRequest) -> node_agent_pb2.Placement:
        raise self._no_placements("PlaceProcess")

    def get_placement(self, placement_id: str) -> node_agent_pb2.Placement:
        raise self._no_placements("GetPlacement")

    def get_pod_placement(self, pod: node_agent_pb2.PodReference) -> node_agent_pb2.GetPodPlacementResponse:
        raise self._no_placements("GetPodPlacement")

    def release_placement(self, placement_id: str) -> None:
        raise self._no_placements("ReleasePlacement")

    def _no_placements(self, rpc: str) -> FailedPrecondition:
        self.agent.take(self.component, rpc)
        return FailedPrecondition(f"{self.component}: the fakes place no process")

    def renew_lease(self, request: node_agent_pb2.RenewLeaseRequest, timeout: float = QUICK_CALL_TIMEOUT_S) -> None:
        self.agent.take(self.component, "RenewLease")
        with self.agent.lock:
            held = {shaping.lease.lease_id for shaping in self.agent.shapings.values()}
            self.agent.renewals += 1
        if request.lease_id not in held:
            raise NotFound(f"{self.component}: no lease {request.lease_id}")

    def apply_shaping(self, request: node_agent_pb2.ApplyShapingRequest) -> node_agent_pb2.Shaping:
        self.agent.take(self.component, "ApplyShaping")
        shaping_id = self.agent.next_id("shp")
        shaping = node_agent_pb2.Shaping(
            shaping_id=shaping_id, target=request.target, direction=request.direction, netem=request.netem,
            lease=node_agent_pb2.Lease(lease_id=f"lease-{shaping_id}", owner=request.owner),
            qdiscs=[node_agent_pb2.InstalledQdisc(interface=request.target.interface, kind="netem", handle="1:")],
        )
        with self.agent.lock:
            self.agent.shapings[shaping_id] = shaping
        return shaping

    def probe_shaping(self, shaping_id: str) -> node_agent_pb2.LinkProbe:
        self.agent.take(self.component, "ProbeShaping")
        shaping = self._shaping(shaping_id)
        return node_agent_pb2.LinkProbe(shaping_id=shaping_id, interface=shaping.target.interface, as_requested=True)

    def list_shaping(self) -> list[node_agent_pb2.Shaping]:
        self.agent.take(self.component, "ListShaping")
        with self.agent.lock:
            return list(self.agent.shapings.values())

    def start_schedule(self, shaping_id: str) -> None:
        self.agent.take(self.component, "StartSchedule")
        self._shaping(shaping_id)

    def stop_schedule(self, shaping_id: str) -> node_agent_pb2.StopScheduleResponse:
        self.agent.take(self.component, "StopSchedule")
        self._shaping(shaping_id)
        return node_agent_pb2.StopScheduleResponse()

    def clear_shaping(self, owner: str) -> None:
        self.agent.take(self.component, "ClearShaping")
        with self.agent.lock:
            for shaping_id in [i for i, s in self.agent.shapings.items() if s.lease.owner == owner]:
                del self.agent.shapings[shaping_id]

    def stream_telemetry(
        self, request: node_agent_pb2.StreamTelemetryRequest
    ) -> ReplyStream[node_agent_pb2.StreamTelemetryResponse]:
        interval = durations.to_seconds(request.interval)

        def produce(cancelled: threading.Event) -> Iterator[node_agent_pb2.StreamTelemetryResponse]:
            self.agent.take(self.component, "StreamTelemetry")
            while not cancelled.wait(interval):
                self.agent.check(self.component)
                sample = common_pb2.TelemetrySample(node=self.agent.handle.node, cpu_percent=50.0)
                sample.time.GetCurrentTime()
                yield node_agent_pb2.StreamTelemetryResponse(sample=sample)

        return FakeStream(produce)

    def _shaping(self, shaping_id: str) -> node_agent_pb2.Shaping:
        with self.agent.lock:
            shaping = self.agent.shapings.get(shaping_id)
        if shaping is None:
            raise NotFound(f"{self.component}: no shaping {shaping_id}")
        return shaping

# --- the backend and the connector ----------------------------------------------------------------


class FakeConnector(AgentConnector):
    """The client of a fake agent: bound to the agent object the backend started, as a channel is
    to its address (a client of an agent that died keeps failing; a new agent gets a new client)."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def sut(self, agent: AgentHandle, component: str) -> SutAgentClient:
        return FakeSutClient(self.backend.agent(agent, FakeSutAgent), component)

    def loadgen(self, agent: AgentHandle, component: str) -> LoadGenAgentClient:
        return FakeLoadGenClient(self.backend.agent(agent, FakeLoadGenAgent), component)

    def node(self, agent: AgentHandle, component: str = "node agent") -> NodeAgentClient:
        return FakeNodeClient(self.backend.agent(agent, FakeNodeAgent), component)


_KINDS: dict[AgentKind, type[FakeAgent]] = {
    AgentKind.SUT: FakeSutAgent, AgentKind.LOADGEN: FakeLoadGenAgent, AgentKind.NODE: FakeNodeAgent,
}


class FakeBackend(DeploymentBackend):
    """Agents as Python objects; `connector` makes their clients. Every client's path to the SUT
    crosses one interface of its own (`client-<i>`) a run's network profile can shape."""

    name = "fake"

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connector = FakeConnector(self)
        self._agents: dict[str, FakeAgent] = {}
        self._by_address: dict[str, FakeAgent] = {}
        self._addresses = itertools.count(1)
        self._lock = threading.Lock()
        self.started: list[str] = []

    def start_agent(
        self, kind: AgentKind, name: str, env: dict[str, str] | None = None, placement: str = ""
    ) -> AgentHandle:
        handle = AgentHandle(name=name, kind=kind, address=f"fake:{next(self._addresses)}", node="fake-node",
                             placement=placement)
        agent = _KINDS[kind](handle, self)
        with self._lock:
            self._agents[name] = agent
            self._by_address[handle.address] = agent
            self.started.append(name)
        return handle

    def agent(self, handle: AgentHandle, kind: type[AgentT]) -> AgentT:
        with self._lock:
            agent = self._by_address[handle.address]
        assert isinstance(agent, kind)
        return agent

    def alive_at(self, address: str) -> bool:
        with self._lock:
            agent = self._by_address.get(address)
        return agent is not None and agent.alive

    def kill(self, name: str) -> None:
        """The agent's process died: calls to it fail, its streams break, the backend sees it gone."""
        with self._lock:
            agent = self._agents.pop(name)
        agent.alive = False

    def stop_agent(self, name: str) -> None:
        with self._lock:
            agent = self._agents.pop(name, None)
        if agent is not None:
            agent.alive = False

    def agents(self) -> list[AgentHandle]:
        with self._lock:
            return [agent.handle for agent in self._agents.values()]

    def is_alive(self, name: str) -> bool:
        with self._lock:
            return name in self._agents

    def shaping_points(self, side: str, client: int) -> list[ShapingPoint]:
        return [ShapingPoint(interface=f"client-{client}", netns=f"fake-{side}")]

    def close(self) -> None:
        for name in [handle.name for handle in self.agents()]:
            self.stop_agent(name)
