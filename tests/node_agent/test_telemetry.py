"""StreamTelemetry over gRPC: samples at the requested interval, counters of the named
interfaces that move with real traffic, declared GPUs, and bad requests refused."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.v1 import node_agent_pb2
from tests.conftest import requires_root
from tests.node_agent.conftest import AgentUnderTest, VethPair, error_code, measure_throughput, target


@requires_root
def test_samples_carry_cpu_memory_interface_counters_and_gpus(
    node_agent: AgentUnderTest, veth_pair: VethPair
) -> None:
    def counters() -> tuple[int, node_agent_pb2.StreamTelemetryResponse]:
        responses = list(
            node_agent.stub.StreamTelemetry(
                node_agent_pb2.StreamTelemetryRequest(
                    interval=Duration(nanos=100_000_000),
                    duration=Duration(nanos=250_000_000),
                    interfaces=[target(veth_pair.right, veth_pair.right_if)],
                ),
                timeout=10,
            )
        )
        assert len(responses) in (2, 3)
        (interface,) = responses[-1].sample.interfaces
        assert interface.name == f"{veth_pair.right}/{veth_pair.right_if}"
        return interface.rx_bytes, responses[-1]

    before, response = counters()
    sample = response.sample
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0 < sample.memory_used_bytes < sample.memory_total_bytes
    assert [g.index for g in sample.gpus] == [0, 1]
    measure_throughput(veth_pair, seconds=0.5, warmup=0.1)
    after, _ = counters()
    assert after - before > 1_000_000


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"interval": Duration(nanos=1_000)}, "interval"),
        ({"interval": Duration(seconds=-1)}, "interval"),
        ({"interfaces": [node_agent_pb2.ShapingTarget(interface="a/b")]}, "interfaces[0].interface"),
    ],
)
def test_bad_telemetry_requests_are_refused(
    node_agent: AgentUnderTest, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        list(node_agent.stub.StreamTelemetry(node_agent_pb2.StreamTelemetryRequest(**request_fields), timeout=10))  # type: ignore[arg-type]
    assert error_code(refused.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "")


def test_gpu_allocation_over_grpc(node_agent: AgentUnderTest) -> None:
    from mecbench.v1 import common_pb2

    reply = node_agent.stub.AllocateGpus(
        node_agent_pb2.AllocateGpusRequest(request=common_pb2.GpuRequest(count=2), owner="run-gpu")
    )
    assert [g.index for g in reply.gpus] == [0, 1] and all(g.allocated_to == reply.lease.lease_id for g in reply.gpus)
    assert reply.env["CUDA_VISIBLE_DEVICES"].count("GPU-") == 2
    with pytest.raises(grpc.RpcError) as busy:
        node_agent.stub.AllocateGpus(
            node_agent_pb2.AllocateGpusRequest(request=common_pb2.GpuRequest(count=1), owner="run-other")
        )
    assert error_code(busy.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "run-gpu" in (busy.value.details() or "")
    released = node_agent.stub.ReleaseGpus(node_agent_pb2.ReleaseGpusRequest(lease_id=reply.lease.lease_id))
    assert list(released.released_indices) == [0, 1]
