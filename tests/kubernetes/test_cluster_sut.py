"""Cluster SUTs (issue 23) on Kubernetes: a head and a worker set, as one LeaderWorkerSet where the
API server serves its CRD, else a head Pod, StatefulSets and a headless Service; against the fake
API (tests/kubernetes/fake_api.py: its scheduler, kubelet, StatefulSet and LeaderWorkerSet
controllers). Order (head Ready, then the workers, each worker Ready before the server may start),
a worker that fails, a stop in reverse order that leaves nothing. (Every object strictly valid:
test_objects.py.)"""

from __future__ import annotations

import pytest

from controller.backends import k8s_objects as objects
from controller.backends.base import AgentHandle
from controller.backends.kubernetes import KubernetesBackend, pod_is_ready
from mecbench.core.errors import FailedPrecondition, InvalidArgument
from mecbench.v1 import sut_agent_pb2
from tests.kubernetes.conftest import Cluster, cluster_config, fake_only
from tests.kubernetes.fake_api import FakeCluster, FakeNode

pytestmark = fake_only  # the fake's controllers, timeline and faults; no cluster runs here

LWS = "LeaderWorkerSet"
KINDS = ("Pod", "Service", "StatefulSet", "NetworkPolicy")


def _fake(cluster: Cluster) -> FakeCluster:
    assert cluster.fake is not None
    return cluster.fake


def _third_node(cluster: Cluster) -> None:
    """Room for a head and two workers, one per node."""
    _fake(cluster).nodes["node-c"] = FakeNode("node-c", cpu=4, memory=16 * 2**30, ip="172.18.0.9")


def _pods(cluster: Cluster, selector: str = "") -> dict[str, dict[str, object]]:
    return {p["metadata"]["name"]: p for p in cluster.api.list("Pod", cluster.namespace, label_selector=selector).items}


def _made(cluster: Cluster, with_lws: bool = False) -> dict[str, set[str]]:
    """What the backend's clusters left in the namespace (the owner ConfigMap aside)."""
    kinds = (*KINDS, LWS) if with_lws else KINDS
    return {kind: names for kind in kinds if (names := cluster.names(kind, objects.MANAGED_SELECTOR)
                                             | cluster.names(kind, objects.LABEL_CLUSTER))}


def _timeline(cluster: Cluster) -> list[tuple[str, str, str]]:
    return [entry for entry in _fake(cluster).timeline if entry[1] != "Event"]


def _start(backend: KubernetesBackend, name: str,
           config: sut_agent_pb2.SutConfig) -> tuple[AgentHandle, list[AgentHandle]]:
    head = backend.start_sut_agent(name, config)
    return head, backend.start_sut_workers(name, config)


# --- refused ---------------------------------------------------------------------------------------


def test_what_a_cluster_cannot_be_on_kubernetes_is_refused_naming_each_field(cluster: Cluster) -> None:
    backend = cluster.backend()
    config = cluster_config("w1", "w2")
    config.args.append("--tensor-parallel-size=2")
    config.cluster.workers[1].gpus.indices.append(0)
    config.cluster.workers[0].node_selector["bad key!"] = "x"
    with pytest.raises(InvalidArgument) as caught:
        backend.start_sut_agent("sut-bad", config)
    assert {v.field for v in caught.value.violations} == {
        "sut.args", "sut.cluster.workers[1].gpus.indices", "sut.cluster.workers[0].node_selector"}
    assert _made(cluster) == {}


# --- order -------------------------------------------------------------------------------------------


def test_statefulset_cluster_head_first_then_workers_each_ready_on_a_node_of_its_own(cluster: Cluster) -> None:
    _third_node(cluster)
    backend = cluster.backend(cluster_ports={"ray": [(6379, 6379), (10002, 10100)]})
    # Two placements: two StatefulSets (one pod template each) under one headless Service.
    config = cluster_config("w1", "w2", cores=(1.0, 0.5))
    assert backend.cluster_shaping_points(0) == []  # nothing deployed yet: asked again once it is
    head = backend.start_sut_agent("sut-tp", config)
    head_pod = head.labels["pod"]
    assert cluster.names("StatefulSet") == set()  # no worker before the head is Ready
    workers = backend.start_sut_workers("sut-tp", config)
    assert [w.name for w in workers] == ["sut-tp-w1", "sut-tp-w2"]
    assert [w.labels["member"] for w in workers] == ["w1", "w2"]

    timeline = _timeline(cluster)
    head_ready = timeline.index(("ready", "Pod", head_pod))
    sets = [i for i, e in enumerate(timeline) if e[:2] == ("create", "StatefulSet")]
    assert len(sets) == 2 and min(sets) > head_ready
    pods = _pods(cluster)
    for worker in workers:
        # Every worker was made after the head was Ready, and is Ready when the call returns
        # (the controller starts the server on the head only then).
        assert timeline.index(("create", "Pod", worker.labels["pod"])) > head_ready
        assert pod_is_ready(pods[worker.labels["pod"]])
        assert worker.address.endswith(":50051") and worker.address.startswith("10.244.")
    # One member per node; each member's resources are its own.
    nodes = [head.node, *(w.node for w in workers)]
    assert len(set(nodes)) == 3 and "" not in nodes
    limits = [pods[w.labels["pod"]]["spec"]["containers"][0]["resources"]["limits"]["cpu"] for w in workers]
    assert limits == ["1000m", "500m"]
    # Stable DNS names under the members' headless Service, which selects every member.
    members = f"{head.labels['service']}-m"
    assert backend.cluster_host(head) == f"{head_pod}.{members}.{cluster.namespace}.svc"
    assert backend.cluster_host(workers[0]) == f"{workers[0].labels['pod']}.{members}.{cluster.namespace}.svc"
    headless = cluster.api.get("Service", cluster.namespace, members)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    for name in (head_pod, *(w.labels["pod"] for w in workers)):
        # DNS names a pod under a headless Service only with its hostname set explicitly.
        assert (pods[name]["spec"]["hostname"], pods[name]["spec"]["subdomain"]) == (name, members)
    # The members reach each other only on the runtime's ports, and only from each other.
    policy = cluster.api.get("NetworkPolicy", cluster.namespace, members)
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {objects.LABEL_CLUSTER: head.labels["service"]}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}, {"protocol": "TCP", "port": 10002, "endPort": 10100}]
    # A worker's placement is read from its own pod (the node agent's GetPodPlacement).
    [point] = backend.sut_shaping_points("sut", 0, workers[1])
    assert point.pod is not None and point.pod.name == workers[1].labels["pod"] and point.node == workers[1].node
    assert not _fake(cluster).requests.count(("create", LWS, ""))  # discovery said: no CRD
    # The link to worker 1 is shaped on that worker pod's own interface.
    [link] = backend.cluster_shaping_points(1)
    assert link.pod is not None and (link.pod.name, link.pod.uid, link.node, link.interface) == (
        workers[1].labels["pod"], workers[1].labels["uid"], workers[1].node, "eth0")
    with pytest.raises(FailedPrecondition, match="no worker 2 of a cluster SUT"):
        backend.cluster_shaping_points(2)
    # A second cluster: which one's link is meant cannot be told.
    backend.start_sut_agent("sut-other", cluster_config("w1"))
    with pytest.raises(FailedPrecondition, match="2 cluster SUTs are deployed"):
        backend.cluster_shaping_points(0)


def test_leader_worker_set_where_served_makes_the_workers_once_the_head_is_ready(cluster: Cluster) -> None:
    _fake(cluster).crds.add(LWS)
    backend = cluster.backend()
    config = cluster_config("w1")
    head, workers = _start(backend, "sut-lws", config)
    assert ("discover", objects.LWS_API_VERSION, "") in _fake(cluster).requests
    [lws] = cluster.api.list(LWS, cluster.namespace).items
    assert cluster.names("StatefulSet") == set()
    leader = head.labels["pod"]
    assert leader == f"{lws['metadata']['name']}-0"
    timeline = _timeline(cluster)
    assert timeline.index(("create", "Pod", workers[0].labels["pod"])) > timeline.index(("ready", "Pod", leader))
    assert head.node != workers[0].node
    # LoadGens dial the head's own Service, which selects the leader pod.
    service = cluster.api.get("Service", cluster.namespace, head.labels["service"])
    assert service["spec"]["selector"] == {objects.LABEL_INSTANCE: head.labels["service"]}
    assert _pods(cluster)[leader]["metadata"]["labels"][objects.LABEL_INSTANCE] == head.labels["service"]
    assert backend.cluster_host(head) == f"{leader}.{lws['metadata']['name']}.{cluster.namespace}.svc"
    assert all(backend.is_alive(a.name) for a in (head, *workers))


def test_workers_placed_differently_need_statefulsets_even_where_lws_is_served(cluster: Cluster) -> None:
    _fake(cluster).crds.add(LWS)
    _third_node(cluster)
    backend = cluster.backend()
    _start(backend, "sut-mixed", cluster_config("w1", "w2", cores=(1.0, 2.0)))
    assert cluster.api.list(LWS, cluster.namespace).items == []
    assert len(cluster.names("StatefulSet")) == 2


# --- a worker that fails -----------------------------------------------------------------------------


def test_a_worker_deleted_during_a_run_is_dead_naming_it_and_its_replacement_is_not_it(cluster: Cluster) -> None:
    backend = cluster.backend()
    head, [worker] = _start(backend, "sut-f", cluster_config("w1"))
    pod = worker.labels["pod"]
    cluster.api.delete("Pod", cluster.namespace, pod)
    # The StatefulSet makes a new pod of the same name: a fresh agent that never joined.
    cluster.eventually(lambda: pod in _pods(cluster) and _pods(cluster)[pod]["metadata"]["uid"] != worker.labels["uid"],
                       what="the StatefulSet's replacement pod")
    assert not backend.is_alive(worker.name)
    assert backend.agent_problem(worker.name).startswith(f"pod {pod} was deleted and replaced by another (uid ")
    assert backend.is_alive(head.name) and backend.agent_problem(head.name) == ""


def test_a_worker_whose_agent_is_oom_killed_is_dead_though_the_kubelet_restarts_it(cluster: Cluster) -> None:
    _fake(cluster).crds.add(LWS)
    backend = cluster.backend()
    head, [worker] = _start(backend, "sut-oom", cluster_config("w1"))
    assert backend.is_alive(worker.name)
    _fake(cluster).kill_container(cluster.namespace, worker.labels["pod"], "sut-agent")
    pod = cluster.api.get("Pod", cluster.namespace, worker.labels["pod"])
    assert pod["status"]["phase"] == "Running"  # restarted in place: only restartCount tells
    assert not backend.is_alive(worker.name)
    assert backend.agent_problem(worker.name) == (
        f"container sut-agent of pod {worker.labels['pod']} restarted (OOMKilled)")
    assert backend.is_alive(head.name)


def test_a_worker_that_cannot_start_fails_naming_the_member_and_leaves_no_worker(cluster: Cluster) -> None:
    backend = cluster.backend()
    config = cluster_config("w1", "big", gpus=(0, 4))
    head = backend.start_sut_agent("sut-nofit", config)
    with pytest.raises(FailedPrecondition) as caught:
        backend.start_sut_workers("sut-nofit", config)
    message = str(caught.value)
    assert message.startswith("cluster member big (agent sut-nofit-big) cannot start (pod ")
    assert "Unschedulable" in message and "Insufficient nvidia.com/gpu" in message
    selector = f"{objects.LABEL_CLUSTER}={head.labels['service']},{objects.LABEL_MEMBER_ROLE}=worker"
    assert _pods(cluster, selector) == {} and cluster.names("StatefulSet") == set()
    assert backend.is_alive(head.name)
    backend.stop_agent(head.name)
    assert _made(cluster) == {}


# --- stop ------------------------------------------------------------------------------------------


def test_stop_goes_in_reverse_order_and_leaves_nothing(cluster: Cluster) -> None:
    _third_node(cluster)
    backend = cluster.backend()
    head, workers = _start(backend, "sut-stop", cluster_config("w1", "w2"))
    start = len(_fake(cluster).timeline)
    backend.stop_sut_workers(head.name, workers)
    # The set was deleted orphaning its pods, then its pods last first, all gone on return.
    removed = [e[2] for e in _fake(cluster).timeline[start:] if e[0] == "remove" and e[1] == "Pod"]
    assert removed == [workers[1].labels["pod"], workers[0].labels["pod"]]
    assert cluster.names("StatefulSet") == set() and set(_pods(cluster)) >= {head.labels["pod"]}
    assert not any(backend.is_alive(w.name) for w in workers)
    assert backend.is_alive(head.name)
    backend.stop_agent(head.name)
    assert _made(cluster) == {}


def test_a_leader_worker_set_goes_with_its_head_and_leaves_nothing(cluster: Cluster) -> None:
    _fake(cluster).crds.add(LWS)
    backend = cluster.backend()
    head, workers = _start(backend, "sut-lstop", cluster_config("w1"))
    backend.stop_sut_workers(head.name, workers)
    backend.stop_agent(head.name)
    # stop_agent returns once every member pod is gone.
    assert _pods(cluster) == {} or all(p["metadata"].get("deletionTimestamp") for p in _pods(cluster).values())
    cluster.eventually(lambda: _made(cluster, with_lws=True) == {} and _pods(cluster) == {},
                       what="the LeaderWorkerSet's Service and pods collected")


def test_close_removes_a_running_cluster_entirely(cluster: Cluster) -> None:
    _fake(cluster).crds.add(LWS)
    _third_node(cluster)
    backend = cluster.backend()
    _start(backend, "sut-a", cluster_config("w1"))
    _start(backend, "sut-b", cluster_config("w1", "w2", cores=(1.0, 0.25)))
    assert len(_pods(cluster)) == 5
    backend.close()
    cluster.eventually(lambda: _made(cluster, with_lws=True) == {} and _pods(cluster) == {},
                       what="every cluster object gone")


def test_a_cluster_change_takes_new_pods(cluster: Cluster) -> None:
    backend = cluster.backend()
    one = cluster_config("w1")
    two = cluster_config("w1")
    two.cluster.workers[0].resources.cpu_cores = 2
    plain = sut_agent_pb2.SutConfig(external=one.external, resources=one.resources)
    assert backend.needs_new_sut_agent(one, two) and backend.needs_new_sut_agent(plain, one)
    three = cluster_config("w1")
    three.cluster.join_timeout.seconds = 600  # the agents' setting, not the pods'
    assert not backend.needs_new_sut_agent(one, three)
    assert not backend.needs_new_sut_agent(one, cluster_config("w1"))


def test_the_operators_cluster_ports_are_parsed_or_refused_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.backends.kubernetes import CLUSTER_PORTS_ENV, KubernetesConfig

    monkeypatch.setenv(CLUSTER_PORTS_ENV, "ray=6379, 8076-8077 ;sglang=*")
    assert KubernetesConfig().cluster_ports == {"ray": [(6379, 6379), (8076, 8077)], "sglang": None}
    for bad in ("ray=6379-80", "ray=", "ray=0", "=6379", "ray=http"):
        monkeypatch.setenv(CLUSTER_PORTS_ENV, bad)
        with pytest.raises(FailedPrecondition, match=CLUSTER_PORTS_ENV):
            KubernetesConfig()
