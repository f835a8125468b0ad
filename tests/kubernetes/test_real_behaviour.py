"""The Kubernetes backend against what real API servers, runtimes and nodes do that the happy
path does not show (issue 20): watches that break mid-way, bookmarks and 410s, an API server
that restarts, controllers that crash and restart, late autoscaler events, transient container
errors, a sidecar that dies, node agents on other nodes. Each test names the defect it covers;
each failed on the code before the fix."""

from __future__ import annotations

from controller.backends.base import AgentKind
from controller.backends.kubernetes import KubernetesBackend
from tests.kubernetes.conftest import PAUSE_IMAGE, Cluster, fake_only
from tests.kubernetes.test_backend import _node_agent_stand_in, synthetic


def _controller_pod(cluster: Cluster, name: str) -> tuple[str, str]:
    """A pod standing in for the controller's own (what the downward API names)."""
    created = cluster.api.create("Pod", cluster.namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mecbench",
                                              "app.kubernetes.io/component": "controller"}},
        "spec": {"terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "controller", "image": PAUSE_IMAGE}]},
    })
    return name, str(created["metadata"]["uid"])


def _crash(cluster: Cluster, backend: KubernetesBackend) -> None:
    """The controller dies without closing (SIGKILL, OOM): its objects stay where they are."""
    cluster.backends.remove(backend)


# --- (2) a restarted controller leaves nothing behind ------------------------------------------


def test_a_restarted_controller_pod_sweeps_what_it_left_before_the_restart(cluster: Cluster) -> None:
    pod, uid = _controller_pod(cluster, "mecbench-controller-5d8c7-x2x9z")
    first = cluster.backend(controller_pod=pod, controller_pod_uid=uid)
    sut = first.start_sut_agent("sut-gpu", synthetic())
    job = first.start_agent(AgentKind.LOADGEN, "job-run1-r1-c0")
    owner = cluster.api.get("ConfigMap", cluster.namespace, first.owner.name)
    assert owner["data"]["podUid"] == uid
    assert owner["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}]
    _crash(cluster, first)

    # The container restarts in the same pod: same pod uid, a new owner; the old one is swept at once
    # (its expiry, a day away, is not waited for).
    second = cluster.backend(controller_pod=pod, controller_pod_uid=uid)
    assert first.owner.name not in cluster.names("ConfigMap")
    cluster.eventually(lambda: not ({sut.labels["pod"], job.labels["pod"]} & cluster.names("Pod"))
                       and sut.labels["service"] not in cluster.names("Service")
                       and job.labels["job"] not in cluster.names("Job"),
                       what="the predecessor's pods, Service and Job to be gone")
    assert second.owner.name in cluster.names("ConfigMap")


def test_a_rescheduled_controller_sweeps_the_owner_of_its_deleted_pod(cluster: Cluster) -> None:
    old_pod, old_uid = _controller_pod(cluster, "mecbench-controller-5d8c7-aaaaa")
    first = cluster.backend(controller_pod=old_pod, controller_pod_uid=old_uid)
    sut = first.start_sut_agent("sut-a", synthetic())
    _crash(cluster, first)
    new_pod, new_uid = _controller_pod(cluster, "mecbench-controller-5d8c7-bbbbb")
    # A live sibling (another controller's pod that still exists) is left alone.
    other_pod, other_uid = _controller_pod(cluster, "mecbench-other-controller")
    other = cluster.backend(controller="other", controller_pod=other_pod, controller_pod_uid=other_uid)
    other_sut = other.start_sut_agent("sut-other", synthetic())
    # Recreate: the old pod is deleted, the new one starts under a new name.
    cluster.api.delete("Pod", cluster.namespace, old_pod)
    cluster.eventually(lambda: old_pod not in cluster.names("Pod"), what="the old controller pod to go")
    cluster.backend(controller_pod=new_pod, controller_pod_uid=new_uid)
    cluster.eventually(lambda: sut.labels["pod"] not in cluster.names("Pod"), what="the old SUT pod to go")
    assert other.owner.name in cluster.names("ConfigMap")
    assert other_sut.labels["pod"] in cluster.names("Pod")


def test_a_restarted_controller_outside_the_cluster_sweeps_its_own_leftovers(cluster: Cluster) -> None:
    first = cluster.backend(controller="laptop")
    sut = first.start_sut_agent("sut-a", synthetic())
    _crash(cluster, first)
    # Another controller with a name of its own does not touch them...
    cluster.backend(controller="elsewhere")
    assert first.owner.name in cluster.names("ConfigMap") and sut.labels["pod"] in cluster.names("Pod")
    # ...the same one started again does.
    cluster.backend(controller="laptop")
    cluster.eventually(lambda: sut.labels["pod"] not in cluster.names("Pod"), what="the leftover SUT pod to go")
    assert first.owner.name not in cluster.names("ConfigMap")


# --- (4) streams that break, bookmarks, 410, an API server restart ------------------------------


@fake_only
def test_a_start_survives_broken_watches_bookmarks_410s_and_an_api_server_restart(cluster: Cluster) -> None:
    assert cluster.fake is not None
    cluster.fake.bookmarks = True
    cluster.fake.cut_watches = 3
    cluster.fake.expire_watches = 1
    cluster.fake.unreachable_lists = 1
    backend = cluster.backend()
    handle = backend.start_sut_agent("sut-flaky-api", synthetic())
    assert backend.is_alive("sut-flaky-api") and handle.node
    assert cluster.fake.watches_cut >= 1
    assert cluster.fake.expire_watches == 0 and cluster.fake.unreachable_lists == 0
    # Stopping waits for the pod to be gone through the same kind of watch.
    cluster.fake.cut_watches = 2
    backend.stop_agent("sut-flaky-api")
    assert handle.labels["pod"] not in {p["metadata"]["name"] for p in cluster.api.list("Pod", cluster.namespace).items}


@fake_only
def test_node_agent_discovery_survives_a_broken_watch(cluster: Cluster) -> None:
    assert cluster.fake is not None
    backend = cluster.backend()
    node = cluster.node_names()[0]
    cluster.fake.cut_watches = 1
    _node_agent_stand_in(cluster, node)
    handle = backend.start_agent(AgentKind.NODE, "node-agent", placement=node)
    assert handle.node == node

