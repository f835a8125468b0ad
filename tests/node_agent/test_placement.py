"""Placement on this machine's real cgroup v1 hierarchies, with real processes: what the node agent
reports is compared with the kernel's own files and /proc, not with the request.

GPUs: there is none here, so the agent's inventory is declared (StaticInventory stands in for
NVML and says so); NVML itself is exercised where a GPU is lent (tests/node_agent/test_gpus.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, node_agent_pb2, node_agent_pb2_grpc
from node_agent.agent import NodeAgent
from node_agent.cgroups import cgroup_mounts, process_groups
from node_agent.gpus import StaticInventory
from node_agent.server import create_server
from node_agent.settings import NodeAgentSettings
from tests.conftest import field_violations, requires_root
from tests.node_agent.conftest import DECLARED_GPUS

V1_MOUNTS, _UNIFIED = cgroup_mounts()
requires_v1 = pytest.mark.skipif(
    not {"cpu", "cpuacct", "cpuset", "memory"} <= set(V1_MOUNTS),
    reason="needs the cgroup v1 cpu, cpuacct, cpuset and memory hierarchies (this machine has them)",
)
pytestmark = [requires_root, requires_v1]


@dataclass
class Placer:
    agent: NodeAgent
    stub: node_agent_pb2_grpc.NodeAgentStub
    settings: NodeAgentSettings
    parent: str

    def group(self, controller: str, placement_id: str) -> Path:
        return V1_MOUNTS[controller] / self.parent / placement_id


def _start_agent(settings: NodeAgentSettings) -> tuple[NodeAgent, object, grpc.Channel]:
    agent = NodeAgent(settings, gpu_inventory=StaticInventory(list(DECLARED_GPUS)), kernel_support=None)
    running, _port = create_server("127.0.0.1:0", settings, agent)
    return agent, running, open_channel(running.address)


@pytest.fixture
def placer(tmp_path: Path) -> Iterator[Placer]:
    parent = f"mecbench-test-{uuid.uuid4().hex[:8]}"
    settings = NodeAgentSettings.load(
        state_dir=tmp_path / "state",
        reaper_interval_s=0.1,
        cgroup_parent=parent,
        probe_kernel=False,
        placeable_processes=("sh -c *", "sleep *", f"{sys.executable} -c *"),
    )
    agent, running, channel = _start_agent(settings)
    try:
        yield Placer(agent, node_agent_pb2_grpc.NodeAgentStub(channel), settings, parent)
    finally:
        channel.close()
        with_release = node_agent_pb2.ReleasePlacementRequest
        for record in agent.store.placements():
            agent.release_placement(with_release(placement_id=record.placement_id))
        running.stop(grace=1)  # type: ignore[attr-defined]
        for mount in set(V1_MOUNTS.values()):
            if (mount / parent).is_dir():
                (mount / parent).rmdir()


@pytest.fixture
def shell() -> Iterator[subprocess.Popen[str]]:
    """A shell that starts a child (`sleep`) when told to on stdin: the child is born after the
    shell was placed, as an inference server is born after its SUT agent was."""
    process = subprocess.Popen(
        ["sh", "-c", "read line; sleep 300 & echo $!; wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    yield process
    process.kill()
    process.wait()
    subprocess.run(["pkill", "-P", str(process.pid)], check=False)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _status_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _place(placer: Placer, pid: int, **resources: object) -> node_agent_pb2.Placement:
    gpus = resources.pop("gpus", None)
    request = node_agent_pb2.PlaceProcessRequest(
        pid=pid,
        resources=common_pb2.ResourceLimits(**resources),  # type: ignore[arg-type]
        owner="run-test",
        lease_duration=durations.from_seconds(30),
    )
    if gpus is not None:
        request.gpus.CopyFrom(gpus)  # type: ignore[arg-type]
    reply: node_agent_pb2.PlaceProcessResponse = placer.stub.PlaceProcess(request, timeout=30)
    return reply.placement


def test_placement_is_applied_read_back_and_inherited(placer: Placer, shell: subprocess.Popen[str]) -> None:
    before = process_groups(shell.pid)
    placement = _place(placer, shell.pid, cpu_cores=0.5, cpus=[1], memory_bytes=256 * 2**20)
    pid_group = placement.placement_id
    applied = placement.applied

    # What the agent reports is what the kernel's files hold.
    cpu, memory, cpuset = (placer.group(c, pid_group) for c in ("cpu", "memory", "cpuset"))
    assert applied.cgroup_version == "v1"
    assert applied.cgroups["cpu"] == str(cpu) and applied.cgroups["memory"] == str(memory)
    assert int(_read(cpu / "cpu.cfs_quota_us")) == applied.cpu_quota_us == 50_000
    assert int(_read(cpu / "cpu.cfs_period_us")) == applied.cpu_period_us == 100_000
    assert applied.cpu_cores == pytest.approx(0.5)
    # Its cores are its weight under contention too: 1024 shares a core; the parent weighs the node's cores.
    assert int(_read(cpu / "cpu.shares")) == applied.cpu_shares == 512
    assert int(_read(cpu.parent / "cpu.shares")) == 1024 * len(placer.agent.placements.cgroups.online_cpus())  # type: ignore[union-attr]
    assert _read(cpuset / "cpuset.cpus") == "1" and list(applied.cpus) == [1]
    assert int(_read(memory / "memory.limit_in_bytes")) == applied.memory_limit_bytes == 256 * 2**20
    assert int(_read(memory / "memory.memsw.limit_in_bytes")) == 256 * 2**20 and applied.swap_limit_bytes == 0
    assert applied.cpus_allowed[shell.pid] == _status_cpus(shell.pid) == "1"
    assert list(applied.pids) == [shell.pid]

    # A process the placed one starts afterwards is born inside, confined the same way.
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write("go\n")
    shell.stdin.flush()
    child = int(shell.stdout.readline())
    assert str(child) in _read(cpu / "cgroup.procs").split()
    assert str(child) in _read(memory / "cgroup.procs").split()
    assert _status_cpus(child) == "1"
    got = placer.stub.GetPlacement(node_agent_pb2.GetPlacementRequest(placement_id=pid_group), timeout=10).placement
    assert sorted(got.applied.pids) == sorted([shell.pid, child])
    assert got.applied.cpus_allowed[child] == "1"
    assert got.lease.owner == "run-test"

    # Released: the groups are gone and the processes are back where they were.
    released = placer.stub.ReleasePlacement(node_agent_pb2.ReleasePlacementRequest(owner="run-test"), timeout=30)
    assert list(released.released_placement_ids) == [pid_group]
    assert not cpu.exists() and not memory.exists() and not cpuset.exists()
    after = process_groups(shell.pid)
    assert {k: after[k] for k in ("cpu", "memory", "cpuset")} == {k: before[k] for k in ("cpu", "memory", "cpuset")}
    assert placer.agent.store.leases() == []
    # Idempotent.
    again = placer.stub.ReleasePlacement(node_agent_pb2.ReleasePlacementRequest(placement_id=pid_group), timeout=10)
    assert list(again.released_placement_ids) == []


def test_cpu_quota_throttles_and_usage_is_counted(placer: Placer) -> None:
    """A process spinning at full speed under 0.2 cores: throttled in most periods, and its CPU
    time about 0.2 of the wall time (the group's own counters, not the node's)."""
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()\nwhile True: pass"], stdin=subprocess.PIPE, text=True
    )
    try:
        placement = _place(placer, spinner.pid, cpu_cores=0.2)
        assert spinner.stdin is not None
        spinner.stdin.write("go\n")
        spinner.stdin.flush()
        started = time.monotonic()
        time.sleep(1.5)
        got = placer.stub.GetPlacement(
            node_agent_pb2.GetPlacementRequest(placement_id=placement.placement_id), timeout=10
        ).placement
        elapsed = time.monotonic() - started
        usage = got.usage
        assert usage.cpu_throttled_periods > 5 and usage.cpu_throttled_ns > 0
        assert usage.cpu_periods >= usage.cpu_throttled_periods
        share = usage.cpu_usage_ns / 1e9 / elapsed
        assert 0.1 < share < 0.3, f"CPU share {share:.2f} under a 0.2-core quota"
        cpuacct = placer.group("cpuacct", placement.placement_id)
        assert int(_read(cpuacct / "cpuacct.usage")) >= usage.cpu_usage_ns
    finally:
        spinner.kill()
        spinner.wait()


def test_impossible_requests_are_refused_and_nothing_is_made(placer: Placer, shell: subprocess.Popen[str]) -> None:
    cases = [
        ({"cpu_cores": 64.0}, "asks for 64 CPU cores; this node has"),
        ({"cpus": [99]}, "core 99 does not exist here"),
        ({"exclusive_cpus": 64}, "asks for 64 exclusive cores"),
        ({"memory_bytes": 2**50}, "bytes of memory; this node has"),
        ({"gpus": common_pb2.GpuRequest(uuids=["GPU-no-such"])}, "no GPU with UUID GPU-no-such"),
        ({"gpus": common_pb2.GpuRequest(count=3)}, "asked for 3 GPUs; this node has 2"),
    ]
    for resources, expected in cases:
        with pytest.raises(grpc.RpcError) as caught:
            _place(placer, shell.pid, **resources)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, resources
        assert expected in (caught.value.details() or ""), caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        _place(placer, shell.pid, cpu_cores=-1.0, memory_bytes=1000, cpus=[0, 0])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"resources.cpu_cores", "resources.memory_bytes", "resources.cpus"}
    with pytest.raises(grpc.RpcError) as caught:
        _place(placer, 2**22 + 12345, cpu_cores=0.5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A request names a PID: only what the operator allows is placed, never init.
    for pid in (1, os.getpid()):
        with pytest.raises(grpc.RpcError) as caught:
            _place(placer, pid, cpu_cores=0.5)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was made, recorded or leased.
    assert placer.agent.store.placements() == [] and placer.agent.store.leases() == []
    assert not any(
        (mount / placer.parent).is_dir() and any((mount / placer.parent).iterdir()) for mount in V1_MOUNTS.values()
    )
    # validate_only checks and makes nothing, also with no process yet.
    checked = placer.stub.PlaceProcess(
        node_agent_pb2.PlaceProcessRequest(
            resources=common_pb2.ResourceLimits(cpu_cores=1.0, exclusive_cpus=1), owner="x", validate_only=True
        ),
        timeout=10,
    ).placement
    assert checked.placement_id == "" and checked.applied.ByteSize() == 0
    assert placer.agent.store.placements() == []


def test_exclusive_cores_are_never_shared(placer: Placer) -> None:
    sleepers = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    try:
        online = placer.agent.placements.cgroups.online_cpus()  # type: ignore[union-attr]
        first = _place(placer, sleepers[0].pid, exclusive_cpus=1)
        second = _place(placer, sleepers[1].pid, exclusive_cpus=1) if len(online) > 1 else None
        held = [first] + ([second] if second else [])
        cores = [p.applied.cpus[0] for p in held]
        assert len(set(cores)) == len(cores)
        for placement, sleeper in zip(held, sleepers, strict=False):
            assert _status_cpus(sleeper.pid) == str(placement.applied.cpus[0])
        # Every core is now reserved: a third exclusive placement, or a pin onto a reserved core, is refused.
        with pytest.raises(grpc.RpcError) as caught:
            _place(placer, sleepers[2].pid, exclusive_cpus=len(online) - len(held) + 1)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as caught:
            _place(placer, sleepers[2].pid, cpus=[cores[0]])
        assert f"core {cores[0]} is reserved by placement {first.placement_id}" in (caught.value.details() or "")
        placer.stub.ReleasePlacement(node_agent_pb2.ReleasePlacementRequest(placement_id=first.placement_id))
        again = _place(placer, sleepers[2].pid, cpus=[cores[0]])
        assert list(again.applied.cpus) == [cores[0]]
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def test_gpus_are_allocated_under_the_placement_and_named_by_uuid(placer: Placer) -> None:
    """Declared GPUs (StaticInventory stands in for NVML: no GPU here)."""
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        placement = _place(placer, sleeper.pid, gpus=common_pb2.GpuRequest(count=1))
        uuid_held = DECLARED_GPUS[0].uuid
        assert placement.env["CUDA_VISIBLE_DEVICES"] == placement.env["NVIDIA_VISIBLE_DEVICES"] == uuid_held
        assert [g.uuid for g in placement.applied.gpus] == [uuid_held]
        assert [g.index for g in placement.usage.gpus] == [0]
        listed = placer.agent.gpus.listed()
        assert listed[0].allocated_to == placement.lease.lease_id and not listed[1].allocated_to
        placer.stub.ReleasePlacement(node_agent_pb2.ReleasePlacementRequest(placement_id=placement.placement_id))
        assert all(not g.allocated_to for g in placer.agent.gpus.listed())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lapsed_lease_releases_and_restart_reconciles(placer: Placer, tmp_path: Path) -> None:
    sleepers = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    try:
        request = node_agent_pb2.PlaceProcessRequest(
            pid=sleepers[0].pid,
            resources=common_pb2.ResourceLimits(cpu_cores=0.5),
            owner="run-lapse",
            lease_duration=durations.from_seconds(0.5),
        )
        lapsing = placer.stub.PlaceProcess(request, timeout=10).placement
        group = placer.group("cpu", lapsing.placement_id)
        assert group.is_dir()
        deadline = time.monotonic() + 10
        while group.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group.exists(), "the reaper did not release a lapsed placement"
        assert placer.agent.store.placements() == []

        # A crash: the agent goes away holding a placement whose lease then lapses; its successor
        # on the same state directory removes it before serving.
        settings = NodeAgentSettings.load(
            state_dir=tmp_path / "crash-state",
            reaper_interval_s=3600,
            cgroup_parent=placer.parent,
            probe_kernel=False,
            placeable_processes=("sleep *",),
        )
        crashed = NodeAgent(settings, gpu_inventory=StaticInventory([]), kernel_support=None)
        request.lease_duration.CopyFrom(durations.from_seconds(0.3))
        request.pid = sleepers[1].pid
        left = crashed.place_process(request)
        crashed.close()
        left_group = placer.group("memory", left.placement_id)
        assert left_group.is_dir()
        time.sleep(0.5)
        successor = NodeAgent(settings, gpu_inventory=StaticInventory([]), kernel_support=None)
        try:
            assert not left_group.exists() and not placer.group("cpu", left.placement_id).exists()
            assert successor.store.placements() == []
        finally:
            successor.close()
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
