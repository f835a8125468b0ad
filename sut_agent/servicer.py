"""SutAgent gRPC servicer: translates messages to and from the lifecycle and data plane."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from mecbench.v1 import sut_agent_pb2, sut_agent_pb2_grpc
from sut_agent.dataplane import DataPlane
from sut_agent.gpu_env import apply_visible_gpus
from sut_agent.lifecycle import BackendManager

MAX_WAIT_S = 365 * 24 * 3600.0
LOG_CHUNK_BYTES = 1024 * 1024


class SutAgentServicer(sut_agent_pb2_grpc.SutAgentServicer):
    def __init__(self, manager: BackendManager, dataplane: DataPlane) -> None:
        self._manager = manager
        self._dataplane = dataplane

    def Start(self, request: sut_agent_pb2.StartRequest, context: grpc.ServicerContext) -> sut_agent_pb2.StartResponse:
        apply_visible_gpus(request.visible_gpus)
        return sut_agent_pb2.StartResponse(status=self._manager.start(request.config, request.restart))

    def GetStatus(
        self, request: sut_agent_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.GetStatusResponse:
        return sut_agent_pb2.GetStatusResponse(status=self._manager.status())

    def GetStats(
        self, request: sut_agent_pb2.GetStatsRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.GetStatsResponse:
        stats = self._manager.stats.snapshot(reset=request.reset)
        stats.server_metrics.update(self._manager.server_metrics(reset=request.reset))
        return sut_agent_pb2.GetStatsResponse(stats=stats)

    def Stop(self, request: sut_agent_pb2.StopRequest, context: grpc.ServicerContext) -> sut_agent_pb2.StopResponse:
        return sut_agent_pb2.StopResponse(status=self._manager.stop())

    def StreamInfer(
        self, request_iterator: Iterator[sut_agent_pb2.StreamInferRequest], context: grpc.ServicerContext
    ) -> Iterator[sut_agent_pb2.StreamInferResponse]:
        stream = self._dataplane.stream(request_iterator)
        context.add_callback(stream.close)
        return self._dataplane.serve_stream(request_iterator, stream)

    def Infer(self, request: sut_agent_pb2.InferRequest, context: grpc.ServicerContext) -> sut_agent_pb2.InferResponse:
        done = threading.Event()
        context.add_callback(done.set)
        remaining = context.time_remaining()
        # Without a deadline gRPC reports ~2^63 seconds, which no wait accepts.
        timeout = remaining if remaining is not None and remaining < MAX_WAIT_S else None
        batch = self._dataplane.infer(request.batch, done, timeout)
        return sut_agent_pb2.InferResponse(batch=batch)

    def StartMember(
        self, request: sut_agent_pb2.StartMemberRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.StartMemberResponse:
        apply_visible_gpus(request.visible_gpus)
        return sut_agent_pb2.StartMemberResponse(status=self._manager.members.start(request))

    def StopMember(
        self, request: sut_agent_pb2.StopMemberRequest, context: grpc.ServicerContext
    ) -> sut_agent_pb2.StopMemberResponse:
        self._manager.stop()  # a head's server spans the cluster: it goes first
        return sut_agent_pb2.StopMemberResponse(status=self._manager.members.stop() or sut_agent_pb2.MemberStatus())

    def GetServerLog(
        self, request: sut_agent_pb2.GetServerLogRequest, context: grpc.ServicerContext
    ) -> Iterator[sut_agent_pb2.GetServerLogResponse]:
        offset = request.offset
        read = self._manager.members.read_log if request.member else self._manager.read_server_log
        data = read(offset, request.limit)
        for start in range(0, len(data), LOG_CHUNK_BYTES):
            yield sut_agent_pb2.GetServerLogResponse(
                offset=offset + start, data=data[start : start + LOG_CHUNK_BYTES]
            )
