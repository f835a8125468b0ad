"""Shaping and node agents on a multi-node cluster (issue 20, defect 7; issue 17: N > 1 shaped
clients on Kubernetes). The cluster is the fake API; the node agents are real ones (the
project's NodeAgent on loopback, one per fake node), resolving the SUT pod by its UID through
the container runtime's records to a real network namespace, where the qdiscs are read back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agents import AgentPool
from controller.backends.base import AgentKind
from controller.backends.kubernetes import KubernetesBackend, KubernetesConfig
from controller.shaping import RunShaping
from mecbench.core.server import RunningServer
from mecbench.v1 import common_pb2
from node_agent.agent import NodeAgent
from node_agent.server import create_server
from node_agent.settings import NodeAgentSettings
from tests.conftest import requires_root
from tests.kubernetes.conftest import IMAGE, PAUSE_IMAGE, Cluster
from tests.kubernetes.fake_api import IMAGE_RUNS, IMAGE_SERVES, FakeCluster, FakeNode
from tests.kubernetes.test_backend import _node_agent_stand_in, synthetic
from tests.node_agent.conftest import VethPair, qdisc_kinds, veth_pair

__all__ = ["veth_pair"]

NAMESPACE = "mecbench-shaping"


def test_the_node_agent_without_a_placement_follows_the_latest_sut(cluster: Cluster) -> None:
    """Telemetry and GPUs come from the node agent beside the SUT; one found before the SUT moved
    to another node must not stay in use (defect 7)."""
    first, second = cluster.node_names()[:2]
    for node in (first, second):
        _node_agent_stand_in(cluster, node)
    backend = cluster.backend()
    cluster.eventually(lambda: set(backend.node_agents()) == {first, second}, what="both node agents ready")
    pool = AgentPool(backend)
    assert pool.node_agent().agent.node == first  # no SUT yet: the first node's
    backend.start_sut_agent("sut-there", synthetic(node_selector={"kubernetes.io/hostname": second}))
    assert pool.node_agent().agent.node == second
    # A node agent found for a node keeps that node as its placement: clearing reaches it again.
    placed = backend.start_agent(AgentKind.NODE, f"node-agent-{first}", placement=first)
    assert placed.placement == first and placed.node == first
    assert backend.is_alive(f"node-agent-{first}")


def _bundle(root: Path, pod_uid: str, netns_path: str) -> None:
    """The SUT pod's sandbox as containerd records it (what the node agent's runtime resolver reads)."""
    bundle = root / pod_uid.replace("-", "")[:12]
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({
        "ociVersion": "1.1.0", "annotations": {"io.kubernetes.cri.sandbox-uid": pod_uid},
        "linux": {"namespaces": [{"type": "network", "path": netns_path}]},
    }))


@pytest.fixture
def two_node_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeCluster, dict[str, str],
                                                                                          Path]]:
    """A fake cluster of two nodes on loopback, a real node agent serving each (its DaemonSet pod
    stands in the fake: host network, the agent's port); (cluster, node -> agent address, bundle root)."""
    bundles = tmp_path / "k8s.io"
    bundles.mkdir()
    monkeypatch.setenv("MECBENCH_NODE_AGENT_RUNTIME_BUNDLE_ROOTS", str(bundles))
    fake = FakeCluster(nodes=[FakeNode("node-a", ip="127.0.0.1"), FakeNode("node-b", ip="127.0.0.1")],
                       images={IMAGE: IMAGE_SERVES, PAUSE_IMAGE: IMAGE_RUNS}, namespaces=(NAMESPACE,))
    servers: list[RunningServer] = []
    addresses = {}
    try:
        for node in ("node-a", "node-b"):
            settings = NodeAgentSettings.load(node_name=node, state_dir=tmp_path / node, reaper_interval_s=0.1,
                                              pod_resolver="runtime")
            running, port = create_server("127.0.0.1:0", settings, NodeAgent(settings))
            servers.append(running)
            addresses[node] = running.address
            fake.create("Pod", NAMESPACE, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"node-agent-{node}", "labels": {
                    "app.kubernetes.io/name": "mecbench", "app.kubernetes.io/component": "node-agent"}},
                "spec": {"nodeName": node, "hostNetwork": True, "terminationGracePeriodSeconds": 0,
                         "containers": [{"name": "node-agent", "image": IMAGE,
                                         "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"}],
                                         "readinessProbe": {"grpc": {"port": port}}}]},
            })
        yield fake, addresses, bundles
    finally:
        for running in servers:
            running.stop(grace=1)
        fake.close()


@requires_root
def test_three_shaped_clients_share_the_sut_pods_one_shaping_on_its_node(
    two_node_cluster: tuple[FakeCluster, dict[str, str], Path], veth_pair: VethPair,
) -> None:
    """Issue 17: every client's path crosses the SUT pod's interface; one shaping serves all three
    (a second ApplyShaping there was ALREADY_EXISTS and failed the run). Defect 7: the SUT is on
    node-b while the node agent first found (no SUT yet) is node-a's: the shaping is applied and
    cleared on node-b's."""
    fake, _addresses, bundles = two_node_cluster
    backend = KubernetesBackend(fake, KubernetesConfig(
        namespace=NAMESPACE, image=IMAGE, controller="shaping-test", service_account="default",
        ready_timeout_s=5.0, delete_timeout_s=5.0, pod_interface=veth_pair.right_if,
    ), maintain=False)
    pool = AgentPool(backend)
    try:
        assert pool.node_agent().agent.node == "node-a"
        sut = backend.start_sut_agent("sut-shaped", synthetic(node_selector={"kubernetes.io/hostname": "node-b"}))
        assert sut.node == "node-b"
        _bundle(bundles, sut.labels["uid"], f"/var/run/netns/{veth_pair.right}")
        profile = common_pb2.NetworkProfile(
            name="wifi-ish", netem=common_pb2.NetemConfig(rate_bps=20_000_000), side=common_pb2.SHAPING_SIDE_SUT,
        )
        with RunShaping(pool, "run-k8s-3", profile, clients=3, lease_s=10.0, sut=sut, probe=False) as shaping:
            assert len(shaping.leases) == 1
            [(node, _lease)] = shaping.leases
            assert node.agent.node == "node-b"
            assert "tbf" in qdisc_kinds(veth_pair.right, veth_pair.right_if)
        # Cleared on node-b's agent at the end, not left to its lease.
        assert "tbf" not in qdisc_kinds(veth_pair.right, veth_pair.right_if)
    finally:
        pool.close()
        backend.close()
