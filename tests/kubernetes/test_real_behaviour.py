"""The Kubernetes backend against what real API servers, runtimes and nodes do that the happy
path does not show (issue 20): watches that break mid-way, bookmarks and 410s, an API server
that restarts, controllers that crash and restart, late autoscaler events, transient container
errors, a sidecar that dies, node agents on other nodes. Each test names the defect it covers;
each failed on the code before the fix."""

from __future__ import annotations

import time

import pytest

from controller.backends.base import AgentKind
from controller.backends.kubernetes import KubernetesBackend
from mecbench.core.errors import FailedPrecondition
from mecbench.v1 import common_pb2, sut_agent_pb2
from tests.kubernetes.conftest import (
    BROKEN_CREATE_IMAGE,
    CRASHING_IMAGE,
    DYING_IMAGE,
    FLAKY_CREATE_IMAGE,
    PAUSE_IMAGE,
    Cluster,
    fake_only,
)
from tests.kubernetes.fake_api import FakeNode
from tests.kubernetes.test_backend import _node_agent_stand_in, owned, synthetic


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



# --- (5) a pod with one dead container -----------------------------------------------------------


def _sidecar(image: str) -> sut_agent_pb2.SutConfig:
    return sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(server_type="openai", endpoint="http://127.0.0.1:8000",
                                                     model="m"),
        image=image,
    )


@fake_only
def test_a_server_sidecar_that_dies_at_start_fails_the_start_at_once(cluster: Cluster) -> None:
    """restartPolicy Never keeps the pod Running while the agent container lives; the dead server
    is never restarted, so the pod can never be ready: say so now, not after the timeout."""
    backend = cluster.backend(ready_timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as caught:
        backend.start_sut_agent("sut-deadserver", _sidecar(CRASHING_IMAGE))
    assert time.monotonic() - started < 15.0
    message = str(caught.value)
    assert "container server exited with code 1" in message
    assert "the agent could not start" in message  # the dead container's last output
    assert not owned(cluster, backend, "Pod")


@fake_only
def test_a_server_sidecar_that_dies_later_makes_the_sut_agent_dead(cluster: Cluster) -> None:
    backend = cluster.backend()
    handle = backend.start_sut_agent("sut-oom", _sidecar(DYING_IMAGE))
    cluster.eventually(lambda: not backend.is_alive("sut-oom"), what="is_alive to see the dead sidecar")
    pod = cluster.api.get("Pod", cluster.namespace, handle.labels["pod"])
    assert pod["status"]["phase"] == "Running"  # what the phase alone would have said


# --- (6) autoscalers and container errors that clear -------------------------------------------


def _gpu_node(name: str, gpus: int) -> FakeNode:
    return FakeNode(name, cpu=16, memory=64 * 2**30, gpus=gpus, labels={"nvidia.com/gpu.present": "true"},
                    taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])


@fake_only
def test_a_gpu_start_waits_for_the_autoscalers_late_triggered_scale_up(cluster: Cluster) -> None:
    """The cluster autoscaler posts TriggeredScaleUp some seconds after the pod's first
    FailedScheduling; the start must not fail in between."""
    assert cluster.fake is not None
    cluster.fake.spare_nodes = [_gpu_node("gpu-2", 4)]
    cluster.fake.scale_up_after_steps = 40
    cluster.fake.node_ready_after_steps = 30
    backend = cluster.backend(unschedulable_grace_s=5.0, ready_timeout_s=20.0)
    handle = backend.start_sut_agent("sut-scaled", synthetic(gpus=common_pb2.GpuRequest(count=2)))
    assert handle.node == "gpu-2"
    reasons = {e["reason"] for e in cluster.api.list("Event", cluster.namespace,
                                                    field_selector=f"involvedObject.name={handle.labels['pod']}").items}
    assert {"FailedScheduling", "TriggeredScaleUp", "Scheduled"} <= reasons


@fake_only
def test_an_autoscaler_that_will_not_scale_up_fails_the_start_without_the_grace(cluster: Cluster) -> None:
    assert cluster.fake is not None
    cluster.fake.scale_up_after_steps = 5  # and no spare node fits: NotTriggerScaleUp
    backend = cluster.backend(unschedulable_grace_s=60.0, ready_timeout_s=60.0)
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match="Unschedulable") as caught:
        backend.start_sut_agent("sut-nogpu", synthetic(gpus=common_pb2.GpuRequest(count=8)))
    assert "NotTriggerScaleUp" in str(caught.value)
    assert time.monotonic() - started < 30.0


@fake_only
def test_a_transient_create_container_error_is_waited_out(cluster: Cluster) -> None:
    backend = cluster.backend(container_error_grace_s=5.0)
    handle = backend.start_sut_agent("sut-busynode", synthetic(image=FLAKY_CREATE_IMAGE))
    assert backend.is_alive("sut-busynode") and handle.node
    events = cluster.api.list("Event", cluster.namespace,
                              field_selector=f"involvedObject.name={handle.labels['pod']}").items
    assert any(e["message"] == "Error: context deadline exceeded" for e in events)


@fake_only
def test_a_lasting_create_container_error_fails_after_its_grace(cluster: Cluster) -> None:
    backend = cluster.backend(container_error_grace_s=0.5, ready_timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match="CreateContainerError: context deadline exceeded"):
        backend.start_sut_agent("sut-neverstarts", synthetic(image=BROKEN_CREATE_IMAGE))
    assert 0.5 <= time.monotonic() - started < 15.0
