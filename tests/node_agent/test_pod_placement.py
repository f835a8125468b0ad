"""Reading back what a Kubernetes pod got. No cluster here: the test lays out a pod's cgroups as
the kubelet does (cgroupfs driver: kubepods/burstable/pod<uid>/<container>) in this machine's
real v1 hierarchies, puts a real process in the container's group and limits the pod-level one;
the GPUs are declared (StaticInventory stands in for NVML, with NVML's process list)."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mecbench.core.channels import open_channel
from mecbench.kubelet import podresources_pb2, podresources_pb2_grpc
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


@contextlib.contextmanager
def pod_cgroups(uid: str, cpu_quota_us: int = 150_000, memory_bytes: int = 256 * 2**20) -> Iterator[FakePod]:
    """The cgroups the kubelet makes for pod `uid` (its pod-level group limited as given), with a
    real process in its container's group; all removed at the end."""
    if not set(HIERARCHIES) <= set(V1_MOUNTS):
        pytest.skip("needs the cgroup v1 cpu, cpuacct and memory hierarchies")
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
        (pod_dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(cpu_quota_us))
        (pod_dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
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


@pytest.fixture
def fake_pod() -> Iterator[FakePod]:
    with pod_cgroups(str(uuid.uuid4())) as pod:
        yield pod


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


class FakeKubelet(podresources_pb2_grpc.PodResourcesListerServicer):
    """The kubelet's pod-resources API on a unix socket, answering with the devices it was told
    each pod holds: a faithful fake (the same service, package and fields the kubelet serves)."""

    def __init__(self, pods: list[podresources_pb2.PodResources]) -> None:
        self.pods = pods
        self.calls = 0

    def List(
        self, request: podresources_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> podresources_pb2.ListPodResourcesResponse:
        self.calls += 1
        return podresources_pb2.ListPodResourcesResponse(pod_resources=self.pods)


@requires_root
def test_a_pods_gpus_come_from_the_kubelets_pod_resources_api_when_mounted(
    fake_pod: FakePod, tmp_path: Path
) -> None:
    """The kubelet says which GPUs it gave the pod, used or not yet; NVML's process list (here
    naming another GPU) is the fallback only. Without the socket, the fallback answers."""
    given = "GPU-00000000-aaaa-0000-0000-000000000000"
    gpus = [
        GpuDevice(0, given, "Declared A", 80 * 2**30, 0),
        GpuDevice(1, "GPU-11111111-bbbb-1111-1111-111111111111", "Declared B", 80 * 2**30, 0,
                  process_ids=(fake_pod.process.pid,)),
    ]
    socket_path = tmp_path / "pod-resources" / "kubelet.sock"
    socket_path.parent.mkdir()
    kubelet = FakeKubelet([
        podresources_pb2.PodResources(name="other", namespace="mecbench", containers=[
            podresources_pb2.ContainerResources(name="c", devices=[
                podresources_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-other"])])]),
        podresources_pb2.PodResources(name="sut-0", namespace="mecbench", containers=[
            podresources_pb2.ContainerResources(name="server", devices=[
                podresources_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[given]),
                podresources_pb2.ContainerDevices(resource_name="example.com/fpga", device_ids=["fpga-0"])])]),
    ])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(kubelet, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        for socket, expected, source in ((socket_path, given, "kubelet-pod-resources"),
                                         (tmp_path / "absent.sock", gpus[1].uuid, "nvml-processes")):
            settings = NodeAgentSettings.load(state_dir=tmp_path / f"state-{source}", probe_kernel=False,
                                              pod_resources_socket=socket)
            agent = NodeAgent(settings, gpu_inventory=StaticInventory(gpus), kernel_support=None)
            running, _port = create_server("127.0.0.1:0", settings, agent)
            try:
                with open_channel(running.address) as channel:
                    reply = node_agent_pb2_grpc.NodeAgentStub(channel).GetPodPlacement(
                        node_agent_pb2.GetPodPlacementRequest(pod=node_agent_pb2.PodReference(
                            uid=fake_pod.uid, namespace="mecbench", name="sut-0")), timeout=30)
            finally:
                running.stop(grace=1)
            assert [g.uuid for g in reply.applied.gpus] == [expected]
            assert reply.applied.gpus_source == source
        assert kubelet.calls == 1
    finally:
        server.stop(grace=0)
