"""A SUT that spans nodes, for real: a Ray cluster (Ray from PyPI, on the CPU) whose head is the
SUT agent in the edge namespace and whose worker is a SUT agent in a SUT node namespace of its
own, joined over their own link; the server on the head (tests/servers/ray_cluster_server.py)
has a replica on each member. LoadGen drives it from a client namespace. Killing the worker's
runtime mid-run fails the run naming the member; a redeploy brings the cluster back; nothing of
Ray and no namespace is left once the controller stops."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.v1 import common_pb2, controller_pb2, controller_pb2_grpc, sut_agent_pb2
from tests.conftest import requires_root
from tests.controller.conftest import Stack, short_settings, stop_stack
from tests.external_servers import prompts_tar
from tests.servers.ray_cluster import SKIP_REASON, ray_available, ray_processes, write_ray_profiles

pytestmark = [requires_root, pytest.mark.skipif(not ray_available(), reason=SKIP_REASON)]

TOPOLOGY = "mbray"
STOPPED: list[bool] = []  # the last test stops the stack itself, to see what it leaves
SUT_ID = "ray-cluster"


def cluster_config() -> sut_agent_pb2.SutConfig:
    return sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(
            profile="ray-server", model="ray-model", options={"api": "completions", "stream": "false",
                                                               "max_tokens": "8"},
            max_concurrency=4,
        ),
        # The worker is placed on its own: one CPU's worth of time, through the node agent.
        cluster=sut_agent_pb2.SutCluster(runtime="ray", workers=[
            sut_agent_pb2.SutMember(name="w1", resources=common_pb2.ResourceLimits(cpu_cores=1.0)),
        ]),
    )


@pytest.fixture(scope="module")
def ray_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    profiles = write_ray_profiles(tmp_path_factory.mktemp("profiles") / "servers.json")
    data_dir: Path = tmp_path_factory.mktemp("ray-cluster")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MECBENCH_SUT_SERVER_PROFILES", str(profiles))
        settings = ControllerSettings.load(
            data_dir=data_dir, topology="netns", topology_clients=1, topology_sut_nodes=1, topology_slot=23,
            topology_name=TOPOLOGY, telemetry_interval_s=0,
        )
        app = ControllerApp(settings)
        server, port = create_server("127.0.0.1:0", settings, app=app)
        channel = open_channel(f"127.0.0.1:{port}")
        stack = Stack(app, server, channel, controller_pb2_grpc.ControllerStub(channel), data_dir)
        try:
            yield stack
        finally:
            if not STOPPED:
                stop_stack(stack)


def run_spec(dataset: common_pb2.DatasetSpec, seconds: float) -> controller_pb2.RunSpec:
    return controller_pb2.RunSpec(
        experiment_id="ray-cluster",
        sut_id=SUT_ID,
        settings=short_settings(
            common_pb2.SCENARIO_SINGLE_STREAM, min_query_count=16, min_duration=durations.from_seconds(seconds)
        ),
        dataset=dataset,
    )


def deploy(stack: Stack) -> controller_pb2.SutDeployment:
    reply = stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id=SUT_ID, config=cluster_config()),
                                 timeout=300)
    return reply.sut


def test_a_server_spanning_two_nodes_is_benchmarked_and_a_dead_worker_fails_the_run(
    ray_stack: Stack, tmp_path: Path
) -> None:
    dataset = common_pb2.DatasetSpec(uri=str(prompts_tar(tmp_path / "prompts.tar")))
    deployment = deploy(ray_stack)
    members = {m.name: m for m in deployment.members}
    assert list(members) == ["head", "w1"]
    assert (members["head"].node, members["w1"].node) == ("edge", "sut-1")
    assert all(m.status.state == sut_agent_pb2.BACKEND_STATE_READY for m in members.values())
    assert members["head"].status.members_joined == 2
    # The worker joined the head over their own link: the head advertises the edge's cluster
    # address, the worker its SUT node's.
    assert members["head"].status.address.startswith("10.233.23.5:")
    assert members["w1"].host == "10.233.23.6"

    # The link between the members is shaped for the run, at both ends (inter-node bandwidth and
    # latency are what tensor parallelism is sensitive to).
    spec = run_spec(dataset, 1.0)
    spec.cluster_network.CopyFrom(
        common_pb2.NetworkProfile(name="dc-200mbit", netem=common_pb2.NetemConfig(rate_bps=200_000_000))
    )
    run = ray_stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = ray_stack.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0]
    assert result.aggregate.failed_samples == 0
    # The load crossed to both members: each node's replica served requests.
    served = {k: v for k, v in result.sut_stats.server_metrics.items() if k.startswith("ray_server_requests_total")}
    assert served.get('ray_server_requests_total{node="10.233.23.5"}', 0) > 0, served
    assert served.get('ray_server_requests_total{node="10.233.23.6"}', 0) > 0, served
    # The result records the cluster: each member, its node and its runtime's state.
    recorded = {m.name: m for m in result.cluster.members}
    assert result.cluster.runtime == "ray"
    assert (recorded["head"].node, recorded["w1"].node) == ("edge", "sut-1")
    assert recorded["w1"].endpoint.name == f"sut-{SUT_ID}-w1"
    # ... and its placement as the kernel holds it: the worker's group has its one CPU.
    assert recorded["w1"].placement.requested.cpu_cores == 1.0
    assert recorded["w1"].placement.applied.cpu_cores == 1.0, recorded["w1"].placement
    assert recorded["w1"].placement.usage.cpu_usage_ns > 0
    assert not recorded["head"].HasField("placement")
    files = ray_stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["result.json", "logs/member-w1.log"])
    ).files
    by_name = {f.name: f.data for f in files}
    document = json.loads(by_name["result.json"])
    assert [m["name"] for m in document["cluster"]["members"]] == ["head", "w1"]
    # The cluster link's shaping, read back from the kernel: a rate limit at each end, and the
    # traffic to the worker's replica crossed it during the repeat.
    link = [q for q in document["network"]["qdiscs"] if q.get("link") == "cluster w1"]
    assert {(q["netns"], q["interface"]) for q in link} == {
        (f"mb-{TOPOLOGY}-edge", "member1"), (f"mb-{TOPOLOGY}-s1", "cluster0")
    }, document["network"]
    assert all(q["kind"] == "tbf" and q["delta"]["packets"] > 0 for q in link), link
    # Each end's probe measured the rate asked for.
    probes = [p for p in document["network"]["probes"] if p.get("link") == "cluster w1"]
    assert len(probes) == 2 and document["network"]["link_as_requested"], document["network"]
    # Each member's runtime log is kept; the first repeat's has its start-up.
    assert b"Ray runtime started" in by_name["logs/member-w1.log"]

    # The worker's node fails mid-run (its runtime's whole process group): the run fails naming it.
    worker = ray_stack.app.pool.get_sut(SUT_ID).workers[0]
    worker_pid = int(members["w1"].status.pid)
    run = ray_stack.stub.StartRun(controller_pb2.StartRunRequest(spec=run_spec(dataset, 60.0))).run
    deadline = time.monotonic() + 120
    while ray_stack.app.runs.get_run(run.run_id).progress.samples_completed < 4:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)
    os.killpg(worker_pid, signal.SIGKILL)
    final = ray_stack.wait(run.run_id, 120)
    assert final.state == common_pb2.RUN_STATE_FAILED
    assert "cluster member w1" in final.error and worker.agent.name in final.error, final.error

    # A redeploy brings a whole new cluster up, and the next run works.
    deployment = deploy(ray_stack)
    assert all(m.status.state == sut_agent_pb2.BACKEND_STATE_READY for m in deployment.members)
    assert {m.name: m for m in deployment.members}["w1"].status.pid != worker_pid
    run = ray_stack.stub.StartRun(controller_pb2.StartRunRequest(spec=run_spec(dataset, 1.0))).run
    final = ray_stack.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error


def session_of(leader: int) -> list[int]:
    """Live processes of the session `leader` leads (a member's runtime: raylet, Ray's workers)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[3]) == leader:
                found.append(int(entry.name))
    return found


def test_nothing_is_left_running(ray_stack: Stack) -> None:
    # The worker's SUT agent is killed outright: its runtime (raylet, Ray's workers) goes with it,
    # and the controller names the member that is gone.
    sut = ray_stack.app.pool.get_sut(SUT_ID)
    worker = sut.workers[0]
    runtime = int(worker.client.get_status().member.pid)
    assert len(session_of(runtime)) > 1
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in session_of(runtime)]
    temp_dirs = {Path(arg.decode().removeprefix("--temp-dir=")) for argv in commands for arg in argv
                 if arg.startswith(b"--temp-dir=")}
    assert len(temp_dirs) == 1 and all(d.is_dir() for d in temp_dirs), temp_dirs
    os.kill(worker.agent.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while session_of(runtime) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_of(runtime) == []
    assert not any(d.exists() for d in temp_dirs)  # the runtime's own files went with it
    assert ray_stack.app.pool.cluster_failure(sut) == f"cluster member w1 (SUT agent {worker.agent.name}) is not running"
    ray_stack.app.pool.remove_sut(SUT_ID)
    assert ray_processes() == []
    STOPPED.append(True)
    stop_stack(ray_stack)
    deadline = time.monotonic() + 15
    while (ray_processes() or any(n.startswith(f"mb-{TOPOLOGY}-") for n in os.listdir("/var/run/netns"))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes() == []
    assert [n for n in os.listdir("/var/run/netns") if n.startswith(f"mb-{TOPOLOGY}-")] == []
