"""Cluster SUTs (issue 23) on Kubernetes, from the controller's side: the agent pool deploys a head
and a worker through the Kubernetes backend (the fake API: its scheduler, StatefulSet controller
and kubelet), records each member's placement as the node agent of the member pod's node reads it
back (RepeatResult.cluster), names why a member pod died when the cluster fails, and shapes a
member link at the worker pod's interface only.

What the fake cannot run is stood in, and only that: the fake runs no process in a pod, so each
member pod's SUT agent is a real SUT agent on loopback (dialled instead of the pod's IP) whose
cluster runtime is a real process from a launch profile that needs no Ray
(tests/sut_agent/test_cluster_members.py); the members reach each other at 127.0.0.1 (the fake has
no DNS); the node agents are real ones on loopback, one per fake node, that find a pod's cgroups
(laid out as the kubelet does, tests/node_agent/test_pod_placement.py) and network namespace
(the container runtime's records, as in test_k8s_shaping.py) by the pod's UID; and the head's
server is not started (a server behind the head is not what these tests are about)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agents import AgentPool, SutHandle
from controller.backends.base import AgentHandle
from controller.backends.kubernetes import KubernetesBackend, KubernetesConfig
from controller.clusters import ClusterWatch, cluster_record
from controller.shaping import RunShaping
from mecbench.core.errors import FailedPrecondition
from mecbench.core.server import RunningServer
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2
from sut_agent.server import create_server
from sut_agent.settings import SutAgentSettings
from tests.conftest import requires_root
from tests.kubernetes.conftest import IMAGE, cluster_config
from tests.kubernetes.fake_api import IMAGE_SERVES, FakeCluster, FakeNode
from tests.kubernetes.test_k8s_shaping import NAMESPACE, _bundle, two_node_cluster
from tests.node_agent.conftest import VethPair, qdisc_kinds, veth_pair
from tests.node_agent.test_pod_placement import pod_cgroups
from tests.sut_agent.test_cluster_members import write_profiles

__all__ = ["two_node_cluster", "veth_pair"]

SUT_ID = "k8s-tp"
HEAD = f"sut-{SUT_ID}"
WORKER = f"{HEAD}-w1"


class LoopbackAgents(KubernetesBackend):
    """The Kubernetes backend, with each member pod's SUT agent dialled at a real agent on loopback
    (the fake runs no process in a pod) and the members reaching each other at 127.0.0.1 (the fake
    has no DNS). Pods, readiness, liveness, why a pod died, and shaping points are the backend's."""

    def __init__(self, api: FakeCluster, config: KubernetesConfig, agents: list[str]) -> None:
        super().__init__(api, config, maintain=False)
        self.loopback = agents

    def start_sut_agent(self, name: str, config: sut_agent_pb2.SutConfig, placement: str = "") -> AgentHandle:
        handle = super().start_sut_agent(name, config, placement)
        return dataclasses.replace(handle, address=self.loopback[0])

    def start_sut_workers(self, name: str, config: sut_agent_pb2.SutConfig) -> list[AgentHandle]:
        workers = super().start_sut_workers(name, config)
        return [dataclasses.replace(w, address=a) for w, a in zip(workers, self.loopback[1:], strict=True)]

    def cluster_host(self, agent: AgentHandle) -> str:
        return "127.0.0.1"


@dataclasses.dataclass
class Deployed:
    fake: FakeCluster
    backend: LoopbackAgents
    pool: AgentPool
    sut: SutHandle
    bundles: Path

    def pod(self, agent: AgentHandle) -> tuple[str, str]:
        """The (name, uid) of the member pod behind `agent`."""
        return agent.labels["pod"], agent.labels["uid"]


@contextlib.contextmanager
def _deployed(fake: FakeCluster, tmp_path: Path, bundles: Path) -> Iterator[Deployed]:
    """A cluster SUT of a head (1 core, 1 GiB) and one worker w1 (0.5 core, 1 GiB), one per
    node, deployed by the agent pool; a pod's interface is named as a VethPair's right end."""
    profiles = write_profiles(tmp_path / "servers.json", joined=2)
    agents: list[RunningServer] = []
    for member in ("head", "w1"):
        settings = SutAgentSettings(server_profiles=profiles, server_log_dir=tmp_path / member, tcp_data_plane=False)
        running, _port = create_server("127.0.0.1:0", settings)
        agents.append(running)
    backend = LoopbackAgents(fake, KubernetesConfig(
        namespace=NAMESPACE, image=IMAGE, controller="cluster-test", service_account="default",
        ready_timeout_s=5.0, delete_timeout_s=5.0, pod_interface=VethPair.right_if,
    ), [a.address for a in agents])
    pool = AgentPool(backend)
    # The server behind the head is not started (see the module's docstring); the runtime is.
    pool._start_backend = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        sut = pool.deploy_sut(SUT_ID, cluster_config("w1", runtime="fake"))
        assert [sut.agent.name, *(m.agent.name for m in sut.workers)] == [HEAD, WORKER]
        assert sut.agent.node != sut.workers[0].agent.node
        yield Deployed(fake, backend, pool, sut, bundles)
    finally:
        with contextlib.suppress(Exception):
            pool.close()
        backend.close()
        for running in agents:
            running.stop(grace=1)


@pytest.fixture
def deployed(two_node_cluster: tuple[FakeCluster, dict[str, str], Path], tmp_path: Path) -> Iterator[Deployed]:
    """The cluster, with a real node agent on each node."""
    fake, _node_agents, bundles = two_node_cluster
    with _deployed(fake, tmp_path, bundles) as cluster:
        yield cluster


@pytest.fixture
def deployed_alone(tmp_path: Path) -> Iterator[Deployed]:
    """The cluster, on nodes without node agents (nothing here needs root)."""
    fake = FakeCluster(nodes=[FakeNode("node-a"), FakeNode("node-b")], images={IMAGE: IMAGE_SERVES},
                       namespaces=(NAMESPACE,))
    try:
        with _deployed(fake, tmp_path, tmp_path) as cluster:
            yield cluster
    finally:
        fake.close()


def _pod_placement(member: controller_pb2.ClusterMember) -> tuple[float, int, str]:
    placement = member.placement
    # The quota over the period: whole and half cores are exact.
    return placement.applied.cpu_cores, placement.applied.memory_limit_bytes, placement.applied.cgroups["cpu"]


@requires_root
def test_each_members_placement_is_read_from_its_own_pod_on_its_own_node(deployed: Deployed) -> None:
    """RepeatResult.cluster on Kubernetes: each member's applied placement, as the node agent of
    the member pod's node reads back the pod's cgroups (the kubelet's doing), with the member's own
    request beside it."""
    head, [worker] = deployed.sut.agent, deployed.sut.workers
    _, head_uid = deployed.pod(head)
    _, worker_uid = deployed.pod(worker.agent)
    with pod_cgroups(head_uid, cpu_quota_us=100_000, memory_bytes=2**30) as head_pod, \
            pod_cgroups(worker_uid, cpu_quota_us=50_000, memory_bytes=2**29) as worker_pod:
        # Telemetry reaches the node agent beside the SUT (the head's node); nothing has used the
        # worker node's agent.
        deployed.pool.node_infos()
        record = cluster_record(deployed.pool, deployed.sut)
        assert record is not None and record.runtime == "fake"
        members = {m.name: m for m in record.members}
        assert list(members) == ["head", "w1"]
        assert (members["head"].node, members["w1"].node) == (head.node, worker.agent.node)
        assert members["w1"].status.state == sut_agent_pb2.BACKEND_STATE_READY
        assert _pod_placement(members["head"]) == (1.0, 2**30, str(head_pod.pod_dirs["cpu"]))
        assert _pod_placement(members["w1"]) == (0.5, 2**29, str(worker_pod.pod_dirs["cpu"]))
        assert list(members["w1"].placement.applied.pids) == [worker_pod.process.pid]
        # Each member's own request: the worker's SutMember, not the head's config.
        assert members["head"].placement.requested.cpu_cores == 1.0
        assert members["w1"].placement.requested.cpu_cores == 0.5


def test_a_member_whose_pod_died_fails_the_cluster_saying_why(deployed_alone: Deployed) -> None:
    """The watcher's message names the member, its agent and what happened to its pod (the
    backend's agent_problem): here the kernel OOM-killed the worker's agent container and the
    kubelet restarted it, so the pod runs on but the member that joined is gone."""
    deployed = deployed_alone
    pool, sut = deployed.pool, deployed.sut
    assert pool.cluster_failure(sut) == ""
    worker_pod, _ = deployed.pod(sut.workers[0].agent)
    deployed.fake.kill_container(NAMESPACE, worker_pod, "sut-agent")
    expected = (f"cluster member w1 (SUT agent {WORKER}) is not running: container sut-agent of pod {worker_pod} "
                "restarted (OOMKilled)")
    assert pool.cluster_failure(sut) == expected
    # The watcher of a running repeat reports it once, as the run's failure.
    failures: list[str] = []
    reported = threading.Event()

    def on_failure(why: str) -> None:
        failures.append(why)
        reported.set()

    with ClusterWatch(pool, sut, on_failure, interval_s=0.01):
        assert reported.wait(10)
    assert failures == [expected]
    # The head's pod deleted: the head is named first, with what happened to its pod.
    head_pod, _ = deployed.pod(sut.agent)
    deployed.fake.delete("Pod", NAMESPACE, head_pod)
    assert pool.cluster_failure(sut).startswith(
        f"cluster member head (SUT agent {HEAD}) is not running: pod {head_pod} ")


def _link_profile(side: common_pb2.ShapingSide.ValueType = common_pb2.SHAPING_SIDE_UNSPECIFIED,
                  direction: common_pb2.Direction.ValueType = common_pb2.DIRECTION_UNSPECIFIED,
                  ) -> common_pb2.NetworkProfile:
    return common_pb2.NetworkProfile(name="interconnect", netem=common_pb2.NetemConfig(rate_bps=50_000_000),
                                     side=side, direction=direction)


def _shaping(deployed: Deployed, profile: common_pb2.NetworkProfile) -> RunShaping:
    return RunShaping(deployed.pool, "run-k8s-cluster", None, 0, lease_s=10.0, sut=deployed.sut.agent,
                      client_profiles=[], probe=False, cluster_profile=profile, cluster_members=["w1"])


@requires_root
def test_a_member_link_is_shaped_both_ways_at_the_worker_pods_interface(deployed: Deployed,
                                                                        veth_pair: VethPair) -> None:
    """Kubernetes has one shaping point per member link, the worker pod's interface: shaped both
    ways unless the profile says a direction, and a side (one end alone) refused naming the field,
    leaving nothing behind."""
    worker = deployed.sut.workers[0].agent
    _bundle(deployed.bundles, deployed.pod(worker)[1], f"/var/run/netns/{veth_pair.right}")
    where = (veth_pair.right, veth_pair.right_if)
    bare = qdisc_kinds(*where)
    for side in (common_pb2.SHAPING_SIDE_SUT, common_pb2.SHAPING_SIDE_LOADGEN):
        with pytest.raises(FailedPrecondition, match=r"^spec\.cluster_network\.side: the kubernetes backend"):
            _shaping(deployed, _link_profile(side)).__enter__()
        assert qdisc_kinds(*where) == bare
    with _shaping(deployed, _link_profile()) as shaping:
        [applied] = shaping.applied
        assert applied.link == "cluster w1" and applied.node.agent.node == worker.node
        # Both directions: the rate limit on egress, and the ingress hook that redirects what
        # arrives to the rate limit of the other direction.
        kinds = qdisc_kinds(*where)
        assert "tbf" in kinds and "ingress" in kinds, kinds
    assert qdisc_kinds(*where) == bare
    with _shaping(deployed, _link_profile(common_pb2.SHAPING_SIDE_BOTH, common_pb2.DIRECTION_EGRESS)):
        kinds = qdisc_kinds(*where)
        assert "tbf" in kinds and "ingress" not in kinds, kinds
    assert qdisc_kinds(*where) == bare
