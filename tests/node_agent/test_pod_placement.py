"""Reading back what a Kubernetes pod got. No cluster here: the test lays out a pod's cgroups as
the kubelet does (cgroupfs driver: kubepods/burstable/pod<uid>/<container>) in this machine's
real v1 hierarchies, puts a real process in the container's group and limits the pod-level one;
the GPUs are declared (StaticInventory stands in for NVML, with NVML's process list)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mecbench.core.channels import open_channel
from mecbench.v1 import node_agent_pb2, node_agent_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.cgroups import cgroup_mounts
from node_agent.gpus import GpuDevice, StaticInventory
from node_agent.podplacement import pod_level
from node_agent.server import create_server
from node_agent.settings import NodeAgentSettings
from tests.conftest import requires_root

V1_MOUNTS, _ = cgroup_mounts()
HIERARCHIES = ("cpu", "cpuacct", "memory")


def test_the_pod_level_group_is_cut_from_either_driver_path() -> None:
    uid = "0b1c2d3e-0000-4000-8000-123456789abc"
    groups = {
        "cpu": f"/kubepods/burstable/pod{uid}/3f2a",
        "memory": f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
        "cri-containerd-3f2a.scope",
        "cpuset": "/",
    }
    assert pod_level(groups, uid) == {
        "cpu": f"/kubepods/burstable/pod{uid}",
        "memory": f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice",
    }


@dataclass
class FakePod:
    uid: str
    pod_dirs: dict[str, Path]
    process: subprocess.Popen[bytes]


@pytest.fixture
def fake_pod() -> Iterator[FakePod]:
    if not set(HIERARCHIES) <= set(V1_MOUNTS):
        pytest.skip("needs the cgroup v1 cpu, cpuacct and memory hierarchies")
    uid = str(uuid.uuid4())
    top = f"mecbench-podtest-{uid[:8]}"
    process = subprocess.Popen(["sleep", "300"])
    made: list[Path] = []
    pod_dirs = {}
    try:
        for hierarchy in HIERARCHIES:
            pod = V1_MOUNTS[hierarchy] / top / "kubepods" / "burstable" / f"pod{uid}"
            container = pod / "c0ffee"
            if not container.exists():
                container.mkdir(parents=True)
                made += [container, pod, pod.parent, pod.parent.parent, pod.parent.parent.parent]
            pod_dirs[hierarchy] = pod
        (pod_dirs["cpu"] / "cpu.cfs_quota_us").write_text("150000")
        (pod_dirs["memory"] / "memory.limit_in_bytes").write_text(str(256 * 2**20))
        for hierarchy in HIERARCHIES:
            (pod_dirs[hierarchy] / "c0ffee" / "cgroup.procs").write_text(str(process.pid))
        yield FakePod(uid, pod_dirs, process)
    finally:
        for hierarchy in HIERARCHIES:
            (V1_MOUNTS[hierarchy] / "cgroup.procs").write_text(str(process.pid))
        process.kill()
        process.wait()
        for path in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                path.rmdir()


@requires_root
def test_the_node_agent_reads_back_what_a_pod_got(fake_pod: FakePod, tmp_path: Path) -> None:
    gpus = [
        GpuDevice(0, "GPU-00000000-aaaa-0000-0000-000000000000", "Declared A", 80 * 2**30, 0),
        GpuDevice(
            1,
            "GPU-11111111-bbbb-1111-1111-111111111111",
            "Declared B",
            80 * 2**30,
            2**30,
            process_ids=(fake_pod.process.pid,),
        ),
    ]
    settings = NodeAgentSettings.load(state_dir=tmp_path / "state", probe_kernel=False)
    agent = NodeAgent(settings, gpu_inventory=StaticInventory(gpus), kernel_support=None)
    running, _port = create_server("127.0.0.1:0", settings, agent)
    channel = open_channel(running.address)
    try:
        stub = node_agent_pb2_grpc.NodeAgentStub(channel)
        reply = stub.GetPodPlacement(
            node_agent_pb2.GetPodPlacementRequest(pod=node_agent_pb2.PodReference(uid=fake_pod.uid)), timeout=30
        )
        applied = reply.applied
        # The pod-level group, as the kubelet limits it, and what its files say.
        assert applied.cgroup_version == "v1"
        assert applied.cgroups["cpu"] == str(fake_pod.pod_dirs["cpu"])
        assert applied.cgroups["memory"] == str(fake_pod.pod_dirs["memory"])
        assert applied.cpu_quota_us == 150_000 and applied.cpu_cores == pytest.approx(1.5)
        assert applied.memory_limit_bytes == int((fake_pod.pod_dirs["memory"] / "memory.limit_in_bytes").read_text())
        assert list(applied.pids) == [fake_pod.process.pid]
        assert fake_pod.process.pid in applied.cpus_allowed
        # The GPU NVML lists the pod's process on, and only that one.
        assert [g.uuid for g in applied.gpus] == [gpus[1].uuid]
        assert [g.index for g in reply.usage.gpus] == [1]

        with pytest.raises(grpc.RpcError) as caught:
            stub.GetPodPlacement(
                node_agent_pb2.GetPodPlacementRequest(pod=node_agent_pb2.PodReference(uid=str(uuid.uuid4()))),
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetPodPlacement(
                node_agent_pb2.GetPodPlacementRequest(pod=node_agent_pb2.PodReference(uid="not-a-uid")), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        running.stop(grace=1)
