"""The Kubernetes backend's logic against a cluster: the fake API by default, a real cluster with
MECBENCH_K8S_TEST_KUBECONFIG (conftest.py). Create and wait for ready, fail fast and time out
with the pod's events, collect logs, stop, close, sweep, garbage collection, node agents."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.backends import k8s_objects as objects
from controller.backends.base import AgentKind
from controller.backends.kubernetes import ClusterApiError, KubernetesBackend, Listing, WatchEvent, format_events
from mecbench.core import durations
from mecbench.core.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument
from mecbench.v1 import common_pb2, node_agent_pb2, sut_agent_pb2
from tests.kubernetes.conftest import (
    CRASHING_IMAGE,
    HANGING_IMAGE,
    IMAGE,
    MISSING_IMAGE,
    PAUSE_IMAGE,
    Cluster,
    fake_only,
)


def synthetic(**fields: object) -> sut_agent_pb2.SutConfig:
    config = sut_agent_pb2.SutConfig(
        synthetic=sut_agent_pb2.SyntheticBackendConfig(
            distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_CONSTANT, mean=durations.from_seconds(0.001)
        ),
        **fields,  # type: ignore[arg-type]
    )
    return config


def owned(cluster: Cluster, backend: KubernetesBackend, kind: str) -> set[str]:
    return cluster.names(kind, f"{objects.LABEL_OWNER}={backend.owner.name}")


# --- create and wait for ready -----------------------------------------------------------------


def test_sut_agent_pod_and_service_become_ready(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.node_names()[0]
    backend = cluster.backend(log_dir=tmp_path)
    config = synthetic(
        resources=common_pb2.ResourceLimits(cpu_cores=0.25, memory_bytes=256 * 2**20),
        node_selector={"kubernetes.io/hostname": node},
        env={"OMP_NUM_THREADS": "4"},
    )
    handle = backend.start_sut_agent("sut-exp1", config)

    pod_name, service_name = handle.labels["pod"], handle.labels["service"]
    assert pod_name.startswith("mecbench-exp1-sut-") and len(pod_name) <= 63
    # Completed by the pods' DNS search path, whatever the cluster's domain (issue 20, defect 10).
    assert handle.address == f"{service_name}.{cluster.namespace}.svc:{objects.GRPC_PORT}"
    other = cluster.backend(controller="fqdn", cluster_domain="k8s.example")
    assert other.start_sut_agent("sut-fqdn", synthetic()).address.endswith(
        f".{cluster.namespace}.svc.k8s.example:{objects.GRPC_PORT}")
    assert backend.sut_address_for(handle, 0) == handle.address
    assert handle.node == node
    assert backend.is_alive("sut-exp1")
    assert [a.name for a in backend.agents()] == ["sut-exp1"]

    pod = cluster.api.get("Pod", cluster.namespace, pod_name)
    labels = pod["metadata"]["labels"]
    assert labels[objects.LABEL_COMPONENT] == "sut-agent"
    assert labels[objects.LABEL_EXPERIMENT] == "exp1"
    assert labels[objects.LABEL_OWNER] == backend.owner.name
    assert pod["metadata"]["ownerReferences"][0]["uid"] == backend.owner.uid
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "250m", "memory": str(256 * 2**20)}
    env = {e["name"]: e["value"] for e in container["env"]}
    # The request's env is the served process's (it travels in the config), never the agent's own.
    assert env == {objects.TCP_DATA_PLANE_ENV: str(objects.TCP_DATA_PLANE_PORT)}

    # The TCP data plane is reachable through the Service, on the port the agent reports.
    service = cluster.api.get("Service", cluster.namespace, service_name)
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"grpc": (objects.GRPC_PORT, "grpc"), "tcp-data": (objects.TCP_DATA_PLANE_PORT, "tcp-data")}
    assert service["spec"]["selector"] == {objects.LABEL_INSTANCE: pod_name}

    # Collected: the agent's output is followed into the log file run.py reads.
    assert handle.log_path == tmp_path / "sut-exp1.log"
    cluster.eventually(lambda: handle.log_path is not None and handle.log_path.exists()
                       and handle.log_path.stat().st_size > 0, what="the agent's log")


def test_loadgen_server_pod_is_addressed_by_pod_ip(cluster: Cluster) -> None:
    backend = cluster.backend()
    handle = backend.start_agent(AgentKind.LOADGEN, "loadgen-default", env={"MECBENCH_LOADGEN_MAX_SESSIONS": "4"})
    pod = cluster.api.get("Pod", cluster.namespace, handle.labels["pod"])
    assert handle.address == f"{pod['status']['podIP']}:{objects.GRPC_PORT}"
    assert pod["metadata"]["labels"][objects.LABEL_COMPONENT] == "loadgen-agent"
    container = pod["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "mecbench-store", "optional": True}}]
    # Guaranteed QoS: a LoadGen is neither throttled to nothing nor evicted first mid-benchmark.
    assert container["resources"]["requests"] == container["resources"]["limits"] == {
        "cpu": "1000m", "memory": str(2 * 2**30)}
    assert container["readinessProbe"]["grpc"] == {"port": objects.GRPC_PORT}
    assert backend.is_alive("loadgen-default")


def test_job_mode_loadgen_runs_as_a_job_and_goes_with_it(cluster: Cluster) -> None:
    backend = cluster.backend()
    handle = backend.start_agent(AgentKind.LOADGEN, "job-abc123-r1-c0")
    job_name = handle.labels["job"]
    job = cluster.api.get("Job", cluster.namespace, job_name)
    assert job["spec"]["ttlSecondsAfterFinished"] == 300
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["labels"][objects.LABEL_EXPERIMENT] == "run-abc123"
    pod = cluster.api.get("Pod", cluster.namespace, handle.labels["pod"])
    assert any(ref["kind"] == "Job" and ref["name"] == job_name for ref in pod["metadata"]["ownerReferences"])
    assert handle.address == f"{pod['status']['podIP']}:{objects.GRPC_PORT}"
    assert backend.is_alive("job-abc123-r1-c0")

    backend.stop_agent("job-abc123-r1-c0")
    # Deleted with propagation Background: the API's default for Jobs would orphan the pod.
    assert job_name not in cluster.names("Job")
    assert handle.labels["pod"] not in cluster.names("Pod")
    assert not backend.is_alive("job-abc123-r1-c0")


@fake_only  # the fake has a GPU node; kind and k3s test clusters have none
def test_sidecar_server_gets_the_gpu_and_the_agent_forwards_to_it(cluster: Cluster) -> None:
    backend = cluster.backend()
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(server_type="openai", endpoint="http://127.0.0.1:8000",
                                                     model="m"),
        image=PAUSE_IMAGE, args=["--port", "8000"], env={"HF_HOME": "/tmp/hf"},
        gpus=common_pb2.GpuRequest(count=1), resources=common_pb2.ResourceLimits(cpu_cores=2),
    )
    handle = backend.start_sut_agent("sut-llm", config)
    assert handle.node == "gpu-1"
    pod = cluster.api.get("Pod", cluster.namespace, handle.labels["pod"])
    agent, server = pod["spec"]["containers"]
    assert agent["image"] == IMAGE and "resources" not in agent
    assert server["image"] == PAUSE_IMAGE and server["args"] == ["--port", "8000"]
    assert server["resources"]["limits"] == {"cpu": "2000m", objects.GPU_RESOURCE: "1"}
    assert pod["spec"]["tolerations"] == [{"key": objects.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


# --- failure paths -----------------------------------------------------------------------------


def test_image_pull_backoff_fails_fast_with_the_reason_and_events(cluster: Cluster) -> None:
    backend = cluster.backend(ready_timeout_s=cluster.ready_timeout_s * 20)
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as caught:
        backend.start_sut_agent("sut-badimage", synthetic(image=MISSING_IMAGE))
    message = str(caught.value)
    assert "ImagePullBackOff" in message
    assert f'Back-off pulling image "{MISSING_IMAGE}"' in message
    assert "Failed to pull image" in message
    # At once, not after the (long) ready timeout.
    assert time.monotonic() - started < cluster.ready_timeout_s * 10
    # Nothing is left of the failed start.
    assert not owned(cluster, backend, "Pod") and not owned(cluster, backend, "Service")
    assert not backend.is_alive("sut-badimage")


def test_unschedulable_gpu_request_reports_insufficient_gpus(cluster: Cluster) -> None:
    backend = cluster.backend()
    with pytest.raises(FailedPrecondition) as caught:
        backend.start_sut_agent("sut-bigmodel", synthetic(gpus=common_pb2.GpuRequest(count=8)))
    message = str(caught.value)
    assert "Unschedulable" in message
    assert "Insufficient nvidia.com/gpu" in message
    assert "FailedScheduling" in message
    assert "allocatable nvidia.com/gpu by node" in message
    assert not owned(cluster, backend, "Pod")


def test_pod_that_never_gets_ready_times_out_with_its_events(cluster: Cluster) -> None:
    if cluster.real:
        # No real image has an agent that never answers; a deadline no pod can meet stands in.
        image, timeout = IMAGE, 0.5
    else:
        image, timeout = HANGING_IMAGE, 0.5
    backend = cluster.backend(ready_timeout_s=timeout)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        backend.start_sut_agent("sut-silent", synthetic(image=image))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert f"was not ready within {timeout:g}s" in message
    if not cluster.real:
        assert "Running, not ready" in message
        assert "Readiness probe failed" in message
    assert timeout <= elapsed < timeout + (30 if cluster.real else 2)
    assert not owned(cluster, backend, "Pod") and not owned(cluster, backend, "Service")


def test_an_image_without_the_agent_fails_fast(cluster: Cluster) -> None:
    backend = cluster.backend()
    with pytest.raises(FailedPrecondition) as caught:
        backend.start_sut_agent("sut-notours", synthetic(image=PAUSE_IMAGE))
    message = str(caught.value)
    assert "StartError" in message or "RunContainerError" in message or "CreateContainerError" in message
    assert "mecbench" in message


@fake_only
def test_crashing_agent_fails_with_its_last_output(cluster: Cluster) -> None:
    backend = cluster.backend()
    with pytest.raises(FailedPrecondition) as caught:
        backend.start_sut_agent("sut-broken", synthetic(image=CRASHING_IMAGE))
    message = str(caught.value)
    assert "exited with code 1" in message
    assert "the agent could not start" in message


def test_sut_config_the_cluster_cannot_serve_creates_nothing(cluster: Cluster) -> None:
    backend = cluster.backend()
    with pytest.raises(InvalidArgument) as caught:
        backend.start_sut_agent("sut-pinned", synthetic(gpus=common_pb2.GpuRequest(uuids=["GPU-1234"]),
                                                        args=["--flag"], node_selector={"bad key!": "x"}))
    fields = {v.field for v in caught.value.violations}
    assert fields == {"sut.gpus.uuids", "sut.args", "sut.node_selector"}
    assert not owned(cluster, backend, "Pod")


def test_an_agent_that_is_running_is_not_started_twice(cluster: Cluster) -> None:
    backend = cluster.backend()
    backend.start_agent(AgentKind.LOADGEN, "loadgen-x")
    with pytest.raises(AlreadyExists):
        backend.start_agent(AgentKind.LOADGEN, "loadgen-x")


def test_a_pod_deleted_behind_the_backend_is_not_alive(cluster: Cluster) -> None:
    backend = cluster.backend()
    handle = backend.start_agent(AgentKind.LOADGEN, "loadgen-y")
    cluster.api.delete("Pod", cluster.namespace, handle.labels["pod"])
    cluster.eventually(lambda: not backend.is_alive("loadgen-y"), what="is_alive to notice")
    # Restarting under the same name replaces it.
    again = backend.start_agent(AgentKind.LOADGEN, "loadgen-y")
    assert again.labels["pod"] != handle.labels["pod"]


@fake_only
def test_watch_resumes_after_410_gone(cluster: Cluster) -> None:
    assert cluster.fake is not None
    fake = cluster.fake

    class GoneOnce:
        """The API server's answer to a watch from a compacted resourceVersion, once."""

        def __init__(self) -> None:
            self.gone = False

        def __getattr__(self, name: str) -> object:
            return getattr(fake, name)

        def watch(self, *args: object, **kwargs: object) -> Iterator[WatchEvent]:
            if not self.gone:
                self.gone = True
                raise ClusterApiError(410, "Expired", "too old resource version")
            return fake.watch(*args, **kwargs)  # type: ignore[arg-type]

        def list(self, *args: object, **kwargs: object) -> Listing:
            return fake.list(*args, **kwargs)  # type: ignore[arg-type]

    wrapped = GoneOnce()
    cluster.api = wrapped  # type: ignore[assignment]
    backend = cluster.backend()
    handle = backend.start_agent(AgentKind.LOADGEN, "loadgen-z")
    assert wrapped.gone and backend.is_alive("loadgen-z")
    assert handle.address


@fake_only
def test_the_fake_api_refuses_invalid_objects_like_the_api_server(cluster: Cluster) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad"},
           "spec": {"containers": [{"name": "c", "image": "x", "unknownField": 1}]}}
    with pytest.raises(ClusterApiError) as caught:
        cluster.api.create("Pod", cluster.namespace, pod)
    assert caught.value.status == 422 and "unknownField" in caught.value.message
    pod["spec"] = {"containers": [{"name": "c", "image": "x", "ports": [{"name": "much-too-long-port-name",
                                                                        "containerPort": 1}]}]}
    with pytest.raises(ClusterApiError) as caught:
        cluster.api.create("Pod", cluster.namespace, pod)
    assert "IANA" in caught.value.message
    with pytest.raises(ClusterApiError) as caught:
        cluster.api.create("Pod", "no-such-namespace", {**pod, "metadata": {"name": "ok"}})
    assert caught.value.status == 404


# --- stop, close, owner references, sweep ------------------------------------------------------


def test_stop_agent_deletes_its_pod_and_service(cluster: Cluster) -> None:
    backend = cluster.backend()
    handle = backend.start_sut_agent("sut-stop", synthetic())
    backend.stop_agent("sut-stop")
    # Gone, not merely terminating: a GPU it held is free for the next SUT.
    pods = {p["metadata"]["name"] for p in cluster.api.list("Pod", cluster.namespace).items}
    assert handle.labels["pod"] not in pods
    assert handle.labels["service"] not in cluster.names("Service")
    assert not backend.is_alive("sut-stop")
    backend.stop_agent("sut-stop")  # stopping what is gone is not an error
    backend.stop_agent("never-started")


def test_close_deletes_everything_it_made(cluster: Cluster) -> None:
    backend = cluster.backend()
    backend.start_sut_agent("sut-a", synthetic())
    backend.start_agent(AgentKind.LOADGEN, "loadgen-default")
    backend.start_agent(AgentKind.LOADGEN, "job-run1-r1-c0")
    assert owned(cluster, backend, "Pod") and owned(cluster, backend, "Job")
    backend.close()
    cluster.eventually(
        lambda: not any(owned(cluster, backend, kind) for kind in ("Pod", "Service", "Job", "ConfigMap")),
        what="every object of the backend to be gone",
    )
    assert backend.owner.name not in cluster.names("ConfigMap")
    assert not backend.is_alive("sut-a")


def test_deleting_the_owner_garbage_collects_the_rest(cluster: Cluster) -> None:
    backend = cluster.backend()
    sut = backend.start_sut_agent("sut-gc", synthetic())
    job = backend.start_agent(AgentKind.LOADGEN, "job-gc-r1-c0")
    cluster.api.delete("ConfigMap", cluster.namespace, backend.owner.name, propagation="Background")
    cluster.eventually(
        lambda: not ({sut.labels["pod"], job.labels["pod"]} & cluster.names("Pod"))
        and sut.labels["service"] not in cluster.names("Service")
        and job.labels["job"] not in cluster.names("Job"),
        what="the owner's dependents to be collected",
    )


def _leftover(cluster: Cluster, name: str, owner: str, expires_at: float, managed: bool = True) -> None:
    labels = {"app.kubernetes.io/name": "mecbench", objects.LABEL_OWNER: owner}
    if managed:
        labels[objects.LABEL_MANAGED_BY] = objects.MANAGED_BY
    cluster.api.create("Pod", cluster.namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {objects.ANNOTATION_EXPIRES_AT: objects.rfc3339(expires_at)}},
        "spec": {"containers": [{"name": "pause", "image": PAUSE_IMAGE}], "terminationGracePeriodSeconds": 0},
    })


def test_sweep_removes_expired_leftovers_but_not_fresh_live_or_foreign_objects(cluster: Cluster) -> None:
    now = time.time()
    backend = cluster.backend()
    # A controller that died an hour ago: its owner and a pod of it, both expired.
    dead_owner = "mecbench-dead-owner-000000"
    cluster.api.create("ConfigMap", cluster.namespace, {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": dead_owner, "labels": {
            "app.kubernetes.io/name": "mecbench", objects.LABEL_MANAGED_BY: objects.MANAGED_BY,
            objects.LABEL_COMPONENT: "owner", objects.LABEL_OWNER: dead_owner},
            "annotations": {objects.ANNOTATION_EXPIRES_AT: objects.rfc3339(now - 3600)}},
    })
    _leftover(cluster, "left-behind", dead_owner, now - 3600)
    _leftover(cluster, "still-fresh", dead_owner, now + 3600)
    _leftover(cluster, "not-ours", dead_owner, now - 3600, managed=False)
    # This live backend's own object is never swept, expired or not.
    _leftover(cluster, "live-owners", backend.owner.name, now - 3600)

    removed = backend.sweep()

    assert sorted(removed) == sorted([f"ConfigMap/{dead_owner}", "Pod/left-behind"])
    present = cluster.names("Pod")
    assert {"still-fresh", "not-ours", "live-owners"} <= present
    assert "left-behind" not in present


def test_renew_keeps_the_owner_from_expiring(cluster: Cluster) -> None:
    clock = [time.time()]
    backend = cluster.backend(ttl_s=60.0)
    backend._clock = lambda: clock[0]  # the backend reads its clock for every expiry
    clock[0] += 120.0
    backend.renew()
    other = cluster.backend(controller="other")
    other._clock = lambda: clock[0]
    assert f"ConfigMap/{backend.owner.name}" not in other.sweep()
    assert backend.owner.name in cluster.names("ConfigMap")


# --- node agents and shaping -------------------------------------------------------------------


def _node_agent_stand_in(cluster: Cluster, node: str) -> str:
    """A pod labelled as the DaemonSet's, on `node` (the real DaemonSet needs the host network
    and root; what discovery reads is its labels, node, IP and gRPC port)."""
    name = f"node-agent-{objects.dns_label(node, 40)}"
    cluster.api.create("Pod", cluster.namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mecbench",
                                              "app.kubernetes.io/component": "node-agent"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "node-agent", "image": PAUSE_IMAGE,
                            "ports": [{"name": "grpc", "containerPort": 50061, "protocol": "TCP"}]}],
        },
    })
    return name


def test_node_agents_are_found_by_label_per_node(cluster: Cluster) -> None:
    nodes = cluster.node_names()[:2]
    for node in nodes:
        _node_agent_stand_in(cluster, node)
    backend = cluster.backend()
    cluster.eventually(lambda: set(backend.node_agents()) == set(nodes), what="both node agents ready")
    found = backend.node_agents()
    for node in nodes:
        pod = cluster.api.get("Pod", cluster.namespace, f"node-agent-{objects.dns_label(node, 40)}")
        assert found[node].address == f"{pod['status']['podIP']}:50061"
        assert found[node].kind == AgentKind.NODE

    handle = backend.start_agent(AgentKind.NODE, "node-agent", placement=nodes[1])
    assert handle.node == nodes[1] and backend.is_alive("node-agent")
    # Without a placement, the node agent beside the latest SUT.
    sut = backend.start_sut_agent("sut-here", synthetic(node_selector={"kubernetes.io/hostname": nodes[0]}))
    assert backend.default_node() == sut.node == nodes[0]
    assert backend.start_agent(AgentKind.NODE, "node-agent-default").node == nodes[0]
    # Stopping a node agent only forgets it: the DaemonSet owns the pod.
    backend.stop_agent("node-agent")
    assert f"node-agent-{objects.dns_label(nodes[1], 40)}" in cluster.names("Pod")


def test_no_node_agent_on_the_node_times_out_saying_so(cluster: Cluster) -> None:
    backend = cluster.backend(ready_timeout_s=0.3 if not cluster.real else 5.0)
    with pytest.raises(DeadlineExceeded, match="no ready node agent on node nowhere"):
        backend.start_agent(AgentKind.NODE, "node-agent", placement="nowhere")


def test_shaping_lands_on_the_sut_pods_own_interface(cluster: Cluster) -> None:
    backend = cluster.backend()
    assert backend.shaping_points("sut", 0) == []  # nothing deployed yet: nothing to refuse
    sut = backend.start_sut_agent("sut-shaped", synthetic())
    [point] = backend.sut_shaping_points("sut", 0, sut)
    pod = cluster.api.get("Pod", cluster.namespace, sut.labels["pod"])
    assert point.interface == "eth0" and point.node == sut.node and point.netns == ""
    assert point.pod is not None and point.pod.uid == pod["metadata"]["uid"]
    assert point.target() == node_agent_pb2.ShapingTarget(
        interface="eth0",
        pod=node_agent_pb2.PodReference(namespace=cluster.namespace, name=sut.labels["pod"],
                                        uid=pod["metadata"]["uid"]),
    )
    assert backend.shaping_points("sut", 3) == [point]
    with pytest.raises(FailedPrecondition, match="SUT pod's own interface"):
        backend.sut_shaping_points("loadgen", 0, sut)
    backend.start_sut_agent("sut-other", synthetic())
    with pytest.raises(FailedPrecondition, match="2 SUT pods"):
        backend.shaping_points("sut", 0)


def test_pod_shaped_config_changes_need_a_new_pod(cluster: Cluster) -> None:
    backend = cluster.backend()
    base = synthetic()
    assert not backend.needs_new_sut_agent(base, synthetic())
    changed_backend = sut_agent_pb2.SutConfig()
    changed_backend.CopyFrom(base)
    changed_backend.synthetic.max_concurrency = 4
    assert not backend.needs_new_sut_agent(base, changed_backend)
    assert backend.needs_new_sut_agent(base, synthetic(gpus=common_pb2.GpuRequest(count=1)))
    assert backend.needs_new_sut_agent(base, synthetic(image="example/other:1"))
    assert backend.needs_new_sut_agent(base, synthetic(node_selector={"a": "b"}))


def test_events_are_formatted_oldest_first_with_repeats() -> None:
    events = [
        {"type": "Warning", "reason": "BackOff", "message": "Back-off pulling image", "count": 3,
         "lastTimestamp": "2026-01-01T00:00:02Z"},
        {"type": "Normal", "reason": "Scheduled", "message": "assigned", "lastTimestamp": "2026-01-01T00:00:01Z"},
    ]
    assert format_events(events) == "Normal Scheduled: assigned; Warning BackOff: Back-off pulling image (x3)"
