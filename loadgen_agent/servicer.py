"""gRPC servicer of mecbench.v1.LoadGenAgent: translates messages, the work is in sessions.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from loadgen_agent.sessions import SessionManager
from mecbench.core.errors import InvalidArgument
from mecbench.v1 import loadgen_agent_pb2, loadgen_agent_pb2_grpc


def _require_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("required", "session_id")


class LoadGenAgentServicer(loadgen_agent_pb2_grpc.LoadGenAgentServicer):
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    def OpenSession(
        self, request: loadgen_agent_pb2.OpenSessionRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.OpenSessionResponse:
        session = self.manager.open_session(request)
        if not context.is_active():  # the caller gave up while the session opened: nobody knows it
            self.manager.close_session(session.session_id)
        return loadgen_agent_pb2.OpenSessionResponse(session=session)

    def RunTest(
        self, request: loadgen_agent_pb2.RunTestRequest, context: grpc.ServicerContext
    ) -> Iterator[loadgen_agent_pb2.RunTestResponse]:
        _require_session_id(request.session_id)
        test_id, events = self.manager.start_test(request)
        # A caller that goes away (cancel, deadline, disconnect) cancels its test.
        context.add_callback(lambda: self.manager.abandon_test(request.session_id, test_id))
        yield from events

    def CancelTest(
        self, request: loadgen_agent_pb2.CancelTestRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.CancelTestResponse:
        _require_session_id(request.session_id)
        return loadgen_agent_pb2.CancelTestResponse(was_running=self.manager.cancel_test(request.session_id))

    def CloseSession(
        self, request: loadgen_agent_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.CloseSessionResponse:
        _require_session_id(request.session_id)
        self.manager.close_session(request.session_id)
        return loadgen_agent_pb2.CloseSessionResponse()

    def ListSessions(
        self, request: loadgen_agent_pb2.ListSessionsRequest, context: grpc.ServicerContext
    ) -> loadgen_agent_pb2.ListSessionsResponse:
        return loadgen_agent_pb2.ListSessionsResponse(sessions=self.manager.list_sessions())
