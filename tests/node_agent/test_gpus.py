"""NVML for real: runs where a GPU is present (the device tool's machine), skips elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, node_agent_pb2, node_agent_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.gpus import NvmlInventory
from node_agent.server import create_server
from node_agent.settings import NodeAgentSettings


def real_gpu_inventory() -> NvmlInventory:
    """NVML's view of this machine's GPUs; the test skips, saying why, where there is none."""
    inventory = NvmlInventory()
    if inventory.unavailable_reason:
        inventory.close()
        pytest.skip(inventory.unavailable_reason)
    return inventory

def test_nvml_inventory_and_readings_on_a_real_gpu() -> None:
    inventory = NvmlInventory()
    try:
        if inventory.unavailable_reason:
            pytest.skip(inventory.unavailable_reason)
        devices = inventory.devices()
        assert devices, "NVML answered but listed no GPU"
        for device in devices:
            assert device.uuid.startswith(("GPU-", "MIG-")) and device.memory_total_bytes > 0 and device.name
        readings = inventory.readings()
        assert [r.index for r in readings] == [d.index for d in devices]
        assert all(0.0 <= r.utilization_percent <= 100.0 and r.power_watts >= 0.0 for r in readings)
    finally:
        inventory.close()


def test_gpus_through_the_node_agent_api_on_a_real_gpu(tmp_path: Path) -> None:
    """GetNodeInfo lists what NVML sees, AllocateGpus pins by UUID and refuses a second holder
    naming the first, ReleaseGpus frees, and telemetry carries the GPU readings."""
    inventory = real_gpu_inventory()
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", reaper_interval_s=0.1)
    agent = NodeAgent(settings, gpu_inventory=inventory)
    running, _port = create_server("127.0.0.1:0", settings, agent)
    channel = open_channel(running.address)
    stub = node_agent_pb2_grpc.NodeAgentStub(channel)
    try:
        listed = stub.GetNodeInfo(node_agent_pb2.GetNodeInfoRequest()).node.gpus
        assert listed and all(g.uuid.startswith(("GPU-", "MIG-")) for g in listed)
        every = len(listed)
        lease = Duration(seconds=60)
        held = stub.AllocateGpus(node_agent_pb2.AllocateGpusRequest(
            request=common_pb2.GpuRequest(count=every), owner="run-first", lease_duration=lease))
        uuids = [g.uuid for g in held.gpus]
        assert sorted(uuids) == sorted(g.uuid for g in listed)
        assert held.env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)
        assert held.env["NVIDIA_VISIBLE_DEVICES"] == ",".join(uuids)
        assert held.resources == {"nvidia.com/gpu": str(every)}
        with pytest.raises(grpc.RpcError) as taken:
            stub.AllocateGpus(node_agent_pb2.AllocateGpusRequest(
                request=common_pb2.GpuRequest(uuids=[uuids[0]]), owner="run-second", lease_duration=lease))
        assert taken.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "run-first" in (taken.value.details() or "")
        released = stub.ReleaseGpus(node_agent_pb2.ReleaseGpusRequest(lease_id=held.lease.lease_id))
        assert sorted(released.released_indices) == sorted(g.index for g in listed)
        again = stub.AllocateGpus(node_agent_pb2.AllocateGpusRequest(
            request=common_pb2.GpuRequest(uuids=[uuids[0]]), owner="run-second", lease_duration=lease))
        assert [g.uuid for g in again.gpus] == [uuids[0]]
        samples = list(stub.StreamTelemetry(node_agent_pb2.StreamTelemetryRequest(
            interval=Duration(nanos=200_000_000), duration=Duration(seconds=1))))
        assert samples and all(len(s.sample.gpus) == every for s in samples)
        assert all(0.0 <= g.utilization_percent <= 100.0 and g.power_watts > 0.0
                   for s in samples for g in s.sample.gpus)
    finally:
        channel.close()
        running.stop(grace=1)  # closes the agent too
        inventory.close()


_CUDA_PROBE = """
import os, sys, time, torch
held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if torch.cuda.device_count() else None
print(torch.cuda.device_count(), os.getpid(), flush=True)
sys.stdin.readline()
"""


def test_the_allocated_environment_pins_a_cuda_process_and_nvml_sees_it(tmp_path: Path) -> None:
    """The env AllocateGpus returns is what a SUT process gets: CUDA shows it exactly the allocated
    GPU, and NVML then lists that process on it. Needs torch (there on the device tool's machine)."""
    pytest.importorskip("torch")
    inventory = real_gpu_inventory()
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", reaper_interval_s=0.1)
    agent = NodeAgent(settings, gpu_inventory=inventory)
    try:
        allocation = agent.allocate_gpus(node_agent_pb2.AllocateGpusRequest(
            request=common_pb2.GpuRequest(count=1), owner="run-cuda", lease_duration=Duration(seconds=60)))
        for env, expected_count in ((allocation.env, 1), ({"CUDA_VISIBLE_DEVICES": "GPU-not-a-real-uuid"}, 0)):
            child = subprocess.Popen([sys.executable, "-c", _CUDA_PROBE], env={**os.environ, **env},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None and child.stdin is not None
                count, pid = (int(x) for x in child.stdout.readline().split())
                assert count == expected_count
                if expected_count:
                    pinned = next(g for g in agent.gpus.listed() if g.uuid == allocation.gpus[0].uuid)
                    # In a container NVML reports host PIDs; either way a process is listed.
                    assert pinned.process_ids, f"NVML lists no process on {pinned.uuid} (child pid {pid})"
                child.stdin.write("\n")
                child.stdin.flush()
                assert child.wait(30) == 0
            finally:
                if child.poll() is None:
                    child.kill()
    finally:
        agent.close()
        inventory.close()
