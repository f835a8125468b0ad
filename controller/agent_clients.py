"""How the controller calls its agents: one typed client per agent kind (SUT, LoadGen, node).

The controller's logic (the pool, runs, shaping, telemetry) sees only these interfaces: a method
per RPC it uses, protobuf messages in and out, the timeouts chosen here, and domain errors
(mecbench.core.errors) that name the agent. The gRPC implementations own the channel and the
stub and decode a failed call once, with the codec the SDK uses (mecbench.core.codec). Tests give
the pool an `AgentConnector` of in-memory fakes instead, and run the state machine without a
socket.

A stream (a LoadGen test's events, a server log, node telemetry) is an iterator of replies whose
breakage raises a domain error; `cancel()` ends it from another thread, after which it ends
quietly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol, TypeVar

import grpc

from controller.backends.base import AgentHandle
from mecbench.core import codec
from mecbench.core.channels import open_channel
from mecbench.v1 import (
    common_pb2,
    loadgen_agent_pb2,
    loadgen_agent_pb2_grpc,
    node_agent_pb2,
    node_agent_pb2_grpc,
    sut_agent_pb2,
    sut_agent_pb2_grpc,
)

# The default deadline of a call that changes or reads an agent's state; the slow ones
# (starting a server, opening a session that loads a dataset) say their own.
CALL_TIMEOUT_S = 30.0
SLOW_CALL_TIMEOUT_S = 60.0
QUICK_CALL_TIMEOUT_S = 10.0

Reply_co = TypeVar("Reply_co", covariant=True)
Request = TypeVar("Request")
Response = TypeVar("Response")


class ReplyStream(Protocol[Reply_co]):
    """A server stream: its replies in order; an agent that fails or dies mid-stream raises a
    domain error naming it. `cancel` (from any thread) ends the stream early, quietly."""

    def __iter__(self) -> Iterator[Reply_co]: ...

    def cancel(self) -> None: ...


class SutAgentClient(Protocol):
    component: str

    def start(self, request: sut_agent_pb2.StartRequest, timeout: float = SLOW_CALL_TIMEOUT_S) -> None: ...

    def stop(self, timeout: float = QUICK_CALL_TIMEOUT_S) -> None: ...

    def get_status(self, timeout: float = QUICK_CALL_TIMEOUT_S) -> sut_agent_pb2.SutStatus: ...

    def get_stats(self, reset: bool) -> sut_agent_pb2.SutStats: ...

    def get_server_log(self, request: sut_agent_pb2.GetServerLogRequest) -> ReplyStream[bytes]: ...

    def start_member(
        self, request: sut_agent_pb2.StartMemberRequest, timeout: float
    ) -> sut_agent_pb2.MemberStatus: ...

    def stop_member(self) -> None: ...

    def close(self) -> None: ...


class LoadGenAgentClient(Protocol):
    component: str

    def open_session(self, request: loadgen_agent_pb2.OpenSessionRequest) -> loadgen_agent_pb2.Session: ...

    def close_session(self, session_id: str) -> None: ...

    def run_test(
        self, request: loadgen_agent_pb2.RunTestRequest, timeout: float, where: str = ""
    ) -> ReplyStream[loadgen_agent_pb2.RunTestResponse]:
        """The test's events; a broken stream's error names the agent and `where` (e.g. "client 1")."""
        ...

    def cancel_test(self, session_id: str) -> bool:
        """Whether a test of the session was running (and is now told to stop)."""
        ...

    def close(self) -> None: ...


class NodeAgentClient(Protocol):
    component: str

    def get_node_info(self) -> common_pb2.NodeInfo: ...

    def place_process(self, request: node_agent_pb2.PlaceProcessRequest) -> node_agent_pb2.Placement: ...

    def get_placement(self, placement_id: str) -> node_agent_pb2.Placement: ...

    def get_pod_placement(
        self, pod: node_agent_pb2.PodReference
    ) -> node_agent_pb2.GetPodPlacementResponse: ...

    def release_placement(self, placement_id: str) -> None: ...

    def renew_lease(self, request: node_agent_pb2.RenewLeaseRequest, timeout: float = QUICK_CALL_TIMEOUT_S) -> None: ...

    def apply_shaping(self, request: node_agent_pb2.ApplyShapingRequest) -> node_agent_pb2.Shaping: ...

    def probe_shaping(self, shaping_id: str) -> node_agent_pb2.LinkProbe: ...

    def list_shaping(self) -> list[node_agent_pb2.Shaping]: ...

    def start_schedule(self, shaping_id: str) -> None: ...

    def stop_schedule(self, shaping_id: str) -> node_agent_pb2.StopScheduleResponse: ...

    def clear_shaping(self, owner: str) -> None: ...

    def stream_telemetry(
        self, request: node_agent_pb2.StreamTelemetryRequest
    ) -> ReplyStream[node_agent_pb2.StreamTelemetryResponse]: ...

    def close(self) -> None: ...


class AgentConnector(Protocol):
    """Makes the client of an agent the backend started; `component` is how its errors name it."""

    def sut(self, agent: AgentHandle, component: str) -> SutAgentClient: ...

    def loadgen(self, agent: AgentHandle, component: str) -> LoadGenAgentClient: ...

    def node(self, agent: AgentHandle, component: str = "node agent") -> NodeAgentClient: ...


# --- gRPC ------------------------------------------------------------------------------------


class _GrpcStream(ReplyStream[Reply_co]):
    def __init__(self, call: Iterator[Reply_co], component: str) -> None:
        self._call = call
        self._component = component
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[Reply_co]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if self._cancelled.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise codec.decode(exc, self._component) from None

    def cancel(self) -> None:
        self._cancelled.set()
        call = self._call
        assert isinstance(call, grpc.Call)
        call.cancel()


class _GrpcClient:
    def __init__(self, address: str, component: str) -> None:
        self.component = component
        self.channel = open_channel(address)

    def _call(
        self, rpc: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request, timeout: float
    ) -> Response:
        try:
            return rpc(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise codec.decode(exc, self.component) from None

    def close(self) -> None:
        self.channel.close()


class GrpcSutAgentClient(_GrpcClient, SutAgentClient):
    def __init__(self, address: str, component: str) -> None:
        super().__init__(address, component)
        self.stub = sut_agent_pb2_grpc.SutAgentStub(self.channel)

    def start(self, request: sut_agent_pb2.StartRequest, timeout: float = SLOW_CALL_TIMEOUT_S) -> None:
        self._call(self.stub.Start, request, timeout)

    def stop(self, timeout: float = QUICK_CALL_TIMEOUT_S) -> None:
        self._call(self.stub.Stop, sut_agent_pb2.StopRequest(), timeout)

    def get_status(self, timeout: float = QUICK_CALL_TIMEOUT_S) -> sut_agent_pb2.SutStatus:
        return self._call(self.stub.GetStatus, sut_agent_pb2.GetStatusRequest(), timeout).status

    def get_stats(self, reset: bool) -> sut_agent_pb2.SutStats:
        return self._call(self.stub.GetStats, sut_agent_pb2.GetStatsRequest(reset=reset), QUICK_CALL_TIMEOUT_S).stats

    def get_server_log(self, request: sut_agent_pb2.GetServerLogRequest) -> ReplyStream[bytes]:
        replies = _GrpcStream(self.stub.GetServerLog(request, timeout=CALL_TIMEOUT_S), self.component)
        return _Chunks(replies)

    def start_member(self, request: sut_agent_pb2.StartMemberRequest, timeout: float) -> sut_agent_pb2.MemberStatus:
        return self._call(self.stub.StartMember, request, timeout).status

    def stop_member(self) -> None:
        self._call(self.stub.StopMember, sut_agent_pb2.StopMemberRequest(), SLOW_CALL_TIMEOUT_S)


class _Chunks(ReplyStream[bytes]):
    """A server log's replies as their bytes."""

    def __init__(self, replies: _GrpcStream[sut_agent_pb2.GetServerLogResponse]) -> None:
        self._replies = replies

    def __iter__(self) -> Iterator[bytes]:
        for reply in self._replies:
            yield reply.data

    def cancel(self) -> None:
        self._replies.cancel()


class GrpcLoadGenAgentClient(_GrpcClient, LoadGenAgentClient):
    def __init__(self, address: str, component: str) -> None:
        super().__init__(address, component)
        self.stub = loadgen_agent_pb2_grpc.LoadGenAgentStub(self.channel)

    def open_session(self, request: loadgen_agent_pb2.OpenSessionRequest) -> loadgen_agent_pb2.Session:
        # Opening a session loads its dataset and connects to the SUT.
        return self._call(self.stub.OpenSession, request, SLOW_CALL_TIMEOUT_S).session

    def close_session(self, session_id: str) -> None:
        self._call(self.stub.CloseSession, loadgen_agent_pb2.CloseSessionRequest(session_id=session_id),
                   QUICK_CALL_TIMEOUT_S)

    def run_test(
        self, request: loadgen_agent_pb2.RunTestRequest, timeout: float, where: str = ""
    ) -> ReplyStream[loadgen_agent_pb2.RunTestResponse]:
        component = f"{self.component} ({where})" if where else self.component
        return _GrpcStream(self.stub.RunTest(request, timeout=timeout), component)

    def cancel_test(self, session_id: str) -> bool:
        reply = self._call(self.stub.CancelTest, loadgen_agent_pb2.CancelTestRequest(session_id=session_id),
                           QUICK_CALL_TIMEOUT_S)
        return reply.was_running


class GrpcNodeAgentClient(_GrpcClient, NodeAgentClient):
    def __init__(self, address: str, component: str) -> None:
        super().__init__(address, component)
        self.stub = node_agent_pb2_grpc.NodeAgentStub(self.channel)

    def get_node_info(self) -> common_pb2.NodeInfo:
        return self._call(self.stub.GetNodeInfo, node_agent_pb2.GetNodeInfoRequest(), CALL_TIMEOUT_S).node

    def place_process(self, request: node_agent_pb2.PlaceProcessRequest) -> node_agent_pb2.Placement:
        return self._call(self.stub.PlaceProcess, request, CALL_TIMEOUT_S).placement

    def get_placement(self, placement_id: str) -> node_agent_pb2.Placement:
        request = node_agent_pb2.GetPlacementRequest(placement_id=placement_id)
        return self._call(self.stub.GetPlacement, request, CALL_TIMEOUT_S).placement

    def get_pod_placement(self, pod: node_agent_pb2.PodReference) -> node_agent_pb2.GetPodPlacementResponse:
        return self._call(self.stub.GetPodPlacement, node_agent_pb2.GetPodPlacementRequest(pod=pod), CALL_TIMEOUT_S)

    def release_placement(self, placement_id: str) -> None:
        request = node_agent_pb2.ReleasePlacementRequest(placement_id=placement_id)
        self._call(self.stub.ReleasePlacement, request, CALL_TIMEOUT_S)

    def renew_lease(self, request: node_agent_pb2.RenewLeaseRequest, timeout: float = QUICK_CALL_TIMEOUT_S) -> None:
        self._call(self.stub.RenewLease, request, timeout)

    def apply_shaping(self, request: node_agent_pb2.ApplyShapingRequest) -> node_agent_pb2.Shaping:
        return self._call(self.stub.ApplyShaping, request, CALL_TIMEOUT_S).shaping

    def probe_shaping(self, shaping_id: str) -> node_agent_pb2.LinkProbe:
        request = node_agent_pb2.ProbeShapingRequest(shaping_id=shaping_id)
        return self._call(self.stub.ProbeShaping, request, CALL_TIMEOUT_S).probe

    def list_shaping(self) -> list[node_agent_pb2.Shaping]:
        return list(self._call(self.stub.ListShaping, node_agent_pb2.ListShapingRequest(), QUICK_CALL_TIMEOUT_S)
                    .shapings)

    def start_schedule(self, shaping_id: str) -> None:
        request = node_agent_pb2.StartScheduleRequest(shaping_id=shaping_id)
        self._call(self.stub.StartSchedule, request, QUICK_CALL_TIMEOUT_S)

    def stop_schedule(self, shaping_id: str) -> node_agent_pb2.StopScheduleResponse:
        # Reads back every step the schedule applied.
        return self._call(self.stub.StopSchedule, node_agent_pb2.StopScheduleRequest(shaping_id=shaping_id), 15.0)

    def clear_shaping(self, owner: str) -> None:
        self._call(self.stub.ClearShaping, node_agent_pb2.ClearShapingRequest(owner=owner), CALL_TIMEOUT_S)

    def stream_telemetry(
        self, request: node_agent_pb2.StreamTelemetryRequest
    ) -> ReplyStream[node_agent_pb2.StreamTelemetryResponse]:
        return _GrpcStream(self.stub.StreamTelemetry(request), self.component)


class GrpcAgentConnector(AgentConnector):
    """The agents' gRPC services, over `mecbench.core.channels.open_channel` (TLS when configured)."""

    def sut(self, agent: AgentHandle, component: str) -> SutAgentClient:
        return GrpcSutAgentClient(agent.address, component)

    def loadgen(self, agent: AgentHandle, component: str) -> LoadGenAgentClient:
        return GrpcLoadGenAgentClient(agent.address, component)

    def node(self, agent: AgentHandle, component: str = "node agent") -> NodeAgentClient:
        return GrpcNodeAgentClient(agent.address, component)
