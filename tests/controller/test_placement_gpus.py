"""GPUs in a placement. There is no GPU here: the node agent's GPUs are declared
(MECBENCH_NODE_AGENT_DECLARED_GPUS, reported as declared, not discovered), which stands in for
NVML; what is checked is the path a real allocation takes: the node agent allocates under the
SUT's placement lease, the controller passes the UUIDs with Start, and the inference server the
SUT agent starts has exactly them in CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES and sits in the
placement's cgroup. NVML itself is exercised where a GPU is present (the last test, skipped here)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.core.errors import InvalidArgument
from mecbench.experiment_file import parse_experiment
from mecbench.v1 import common_pb2, controller_pb2, node_agent_pb2, sut_agent_pb2
from node_agent.agent import NodeAgent
from node_agent.cgroups import cgroup_mounts
from node_agent.settings import NodeAgentSettings
from sut_agent.gpu_env import apply_visible_gpus
from tests.conftest import requires_root
from tests.controller.conftest import Stack
from tests.external_servers import CLASSIFIER_NAME, Models, build_models, stack_with_servers, write_profiles
from tests.node_agent.test_gpus import real_gpu_inventory

DECLARED = ("GPU-aaaaaaaa-0000-0000-0000-000000000000=Declared A", "GPU-bbbbbbbb-1111-1111-1111-111111111111")
V1_MOUNTS, _ = cgroup_mounts()


def test_visible_gpus_are_uuids_set_for_what_the_agent_starts() -> None:
    environ: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "0"}
    assert apply_visible_gpus([], environ) == {} and environ == {"CUDA_VISIBLE_DEVICES": "0"}
    uuid = DECLARED[1]
    apply_visible_gpus([uuid], environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": uuid, "NVIDIA_VISIBLE_DEVICES": uuid}
    with pytest.raises(InvalidArgument) as caught:
        apply_visible_gpus(["0", "GPU-ok", "all"], environ)
    assert [v.field for v in caught.value.violations] == ["visible_gpus[0]", "visible_gpus[2]"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(
        tmp_path_factory, profiles, models.directory, MECBENCH_NODE_AGENT_DECLARED_GPUS=",".join(DECLARED)
    ) as running:
        yield running


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@requires_root
@pytest.mark.skipif(not {"cpu", "memory"} <= set(V1_MOUNTS), reason="needs the cgroup v1 hierarchies")
def test_the_server_sees_exactly_the_allocated_gpu_and_is_in_the_placement(stack: Stack) -> None:
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(profile="model-server-kserve-http", model=CLASSIFIER_NAME),
        resources=common_pb2.ResourceLimits(cpu_cores=1.0),
        gpus=common_pb2.GpuRequest(count=1),
    )
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="gpu", config=config))
    try:
        sut = stack.app.pool.get_sut("gpu")
        server_pid = stack.app.pool.sut_status(sut).server_pid
        assert server_pid > 0
        placement = stack.app.pool.read_placement(sut)
        assert placement is not None
        held = [g.uuid for g in placement.applied.gpus]
        assert held == [DECLARED[0].partition("=")[0]]
        environment = _environ(server_pid)
        assert environment["CUDA_VISIBLE_DEVICES"] == environment["NVIDIA_VISIBLE_DEVICES"] == held[0]
        # The server was started after the agent was placed: it is in the same group.
        assert server_pid in placement.applied.pids and sut.agent.pid in placement.applied.pids
        cpu_group = Path(placement.applied.cgroups["cpu"])
        assert str(server_pid) in (cpu_group / "cgroup.procs").read_text().split()
        assert [g.index for g in placement.usage.gpus] == [0]

        # The other GPU is free; a second SUT asking for two is refused up front, starting nothing.
        greedy = sut_agent_pb2.SutConfig()
        greedy.CopyFrom(config)
        greedy.gpus.count = 2
        with pytest.raises(grpc.RpcError) as caught:
            stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="greedy", config=greedy))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "asked for 2 GPUs; this node has 2, 1 free" in (caught.value.details() or "")
        assert "declared by the operator" in (caught.value.details() or "")
        assert "sut-greedy" not in {a.name for a in stack.app.pool.backend.agents()}
    finally:
        stack.app.pool.remove_sut("gpu")
    infos = stack.app.pool.node_infos()
    assert all(not g.allocated_to for g in infos[0].gpus)
    assert "declared by the operator" in infos[0].labels["gpus"]


@requires_root
@pytest.mark.gpu
def test_a_real_gpu_is_placed_by_uuid(tmp_path: Path) -> None:
    """Where NVML answers (the device tool's machine): a placed process holds one real GPU, named
    by the UUID NVML gives, with its readings in the placement's usage."""
    inventory = real_gpu_inventory()
    settings = NodeAgentSettings.load(
        state_dir=tmp_path / "state",
        placeable_processes=("sleep *",),
        cgroup_parent="mecbench-gpu-test",
        probe_kernel=False,
    )
    agent = NodeAgent(settings, gpu_inventory=inventory)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        placement = agent.place_process(
            node_agent_pb2.PlaceProcessRequest(
                pid=sleeper.pid,
                gpus=common_pb2.GpuRequest(count=1),
                owner="run-gpu",
                lease_duration=Duration(seconds=60),
            )
        )
        uuids = {d.uuid for d in inventory.devices()}
        assert len(placement.applied.gpus) == 1 and placement.applied.gpus[0].uuid in uuids
        assert placement.env["CUDA_VISIBLE_DEVICES"] == placement.applied.gpus[0].uuid
        assert len(placement.usage.gpus) == 1 and placement.usage.gpus[0].memory_used_bytes >= 0
        agent.release_placement(node_agent_pb2.ReleasePlacementRequest(owner="run-gpu"))
    finally:
        sleeper.kill()
        sleeper.wait()
        agent.close()
        inventory.close()
        for mount in set(V1_MOUNTS.values()):
            if (mount / "mecbench-gpu-test").is_dir():
                (mount / "mecbench-gpu-test").rmdir()


GPU_SWEEP = """
experiment_id: gpu-sweep
skip_calibration: true
sut:
  synthetic: {distribution: SERVICE_TIME_DISTRIBUTION_CONSTANT, mean: 0.001s}
dataset:
  synthetic: {sample_count: 16, shape: [4], data_type: DATA_TYPE_FLOAT32}
settings:
  scenario: SCENARIO_OFFLINE
  offline_expected_qps: 200
  min_duration: 0.5s
  min_query_count: 50
sweep:
  gpu_counts: [1, 2]
"""


@requires_root
def test_gpu_counts_are_a_sweep_axis(stack: Stack) -> None:
    spec = parse_experiment(GPU_SWEEP)
    stack.app.experiments.start(spec)
    final = stack.app.experiments.wait("gpu-sweep", 120)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    held: dict[str, list[str]] = {}
    for run_id in final.run_ids:
        run = stack.app.runs.get_run(run_id)
        placement = run.results[0].placement
        assert placement.requested_gpus.count == len(placement.applied.gpus)
        held[run.spec.selector] = [g.uuid for g in placement.applied.gpus]
    uuids = [entry.partition("=")[0] for entry in DECLARED]
    assert held == {"offline-c1-unshaped-gpu1": uuids[:1], "offline-c1-unshaped-gpu2": uuids}
    # Released with the experiment's SUT (removed just after the experiment ends).
    deadline = time.monotonic() + 30
    while any(g.allocated_to for g in stack.app.pool.node_infos()[0].gpus):
        assert time.monotonic() < deadline, "the experiment's GPUs were not released"
        time.sleep(0.1)
