"""NodeAgent gRPC servicer: translates messages to and from NodeAgent."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mecbench.v1 import node_agent_pb2, node_agent_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.shaping import lease_message


class NodeAgentServicer(node_agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent: NodeAgent, address: str) -> None:
        self._agent = agent
        self.address = address

    def GetNodeInfo(
        self, request: node_agent_pb2.GetNodeInfoRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.GetNodeInfoResponse:
        return node_agent_pb2.GetNodeInfoResponse(node=self._agent.node_info(self.address))

    def ApplyShaping(
        self, request: node_agent_pb2.ApplyShapingRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ApplyShapingResponse:
        return node_agent_pb2.ApplyShapingResponse(shaping=self._agent.apply_shaping(request))

    def ClearShaping(
        self, request: node_agent_pb2.ClearShapingRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ClearShapingResponse:
        return node_agent_pb2.ClearShapingResponse(cleared_shaping_ids=self._agent.clear_shaping(request))

    def ListShaping(
        self, request: node_agent_pb2.ListShapingRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ListShapingResponse:
        return self._agent.list_shaping(request.include_foreign)

    def ProbeShaping(
        self, request: node_agent_pb2.ProbeShapingRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ProbeShapingResponse:
        return node_agent_pb2.ProbeShapingResponse(probe=self._agent.probe_shaping(request))

    def StartSchedule(
        self, request: node_agent_pb2.StartScheduleRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.StartScheduleResponse:
        return self._agent.start_schedule(request)

    def StopSchedule(
        self, request: node_agent_pb2.StopScheduleRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.StopScheduleResponse:
        return self._agent.stop_schedule(request)

    def RenewLease(
        self, request: node_agent_pb2.RenewLeaseRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.RenewLeaseResponse:
        return node_agent_pb2.RenewLeaseResponse(lease=lease_message(self._agent.renew_lease(request)))

    def AllocateGpus(
        self, request: node_agent_pb2.AllocateGpusRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.AllocateGpusResponse:
        allocation = self._agent.allocate_gpus(request)
        held = {d.uuid for d in allocation.gpus}
        return node_agent_pb2.AllocateGpusResponse(
            lease=lease_message(allocation.lease),
            gpus=[g for g in self._agent.gpus.listed() if g.uuid in held],
            env=allocation.env,
            resources=allocation.resources,
        )

    def ReleaseGpus(
        self, request: node_agent_pb2.ReleaseGpusRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ReleaseGpusResponse:
        return node_agent_pb2.ReleaseGpusResponse(released_indices=self._agent.release_gpus(request.lease_id))

    def PlaceProcess(
        self, request: node_agent_pb2.PlaceProcessRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.PlaceProcessResponse:
        return node_agent_pb2.PlaceProcessResponse(placement=self._agent.place_process(request))

    def GetPlacement(
        self, request: node_agent_pb2.GetPlacementRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.GetPlacementResponse:
        return node_agent_pb2.GetPlacementResponse(placement=self._agent.get_placement(request.placement_id))

    def GetPodPlacement(
        self, request: node_agent_pb2.GetPodPlacementRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.GetPodPlacementResponse:
        return self._agent.pod_placement(request)

    def ReleasePlacement(
        self, request: node_agent_pb2.ReleasePlacementRequest, context: grpc.ServicerContext
    ) -> node_agent_pb2.ReleasePlacementResponse:
        return node_agent_pb2.ReleasePlacementResponse(
            released_placement_ids=self._agent.release_placement(request)
        )

    def StreamTelemetry(
        self, request: node_agent_pb2.StreamTelemetryRequest, context: grpc.ServicerContext
    ) -> Iterator[node_agent_pb2.StreamTelemetryResponse]:
        samples = self._agent.telemetry(request, context.is_active)
        for sample in samples:
            yield node_agent_pb2.StreamTelemetryResponse(sample=sample)
