"""Kubernetes backend: each agent is a pod in one namespace, created, watched and deleted through
the API server.

- SUT agent: a Pod (the SutConfig's image, resources, GPUs and node selector; an external
  server image as a sidecar) and a Service exposing its gRPC port and its plain-TCP data-plane
  port; LoadGens reach it at the Service's DNS name.
- LoadGen server: a Pod. Job-mode LoadGen (`job-...` agents): a Job of one pod.
- Node agents: not made here but found, one per node, among the DaemonSet's pods (label
  selector), addressed by pod IP (they use the host network).

Readiness is the kubelet's gRPC health probe, waited for with a watch on the pod (never a sleep
loop) under a deadline; a pod that cannot start (image pull errors, a crashing agent, no node
with room for its requests) fails at once with its reason and its recent Events in the error.

Every object names this controller's owner ConfigMap in an owner reference (deleting it removes
the rest through the garbage collector), carries the MECBench labels, and an expiry annotation
that a sweep reads to remove what dead controllers left behind. Jobs also carry a TTL.

The cluster is reached through `ClusterApi`, a narrow protocol over the object kinds used, with
`KubernetesApi` as the real implementation (the official client's REST layer, JSON in and out)
and an in-memory fake in the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from controller.backends import k8s_objects as objects
from controller.backends.base import AgentHandle, AgentKind, DeploymentBackend, PodRef, ShapingPoint
from controller.backends.k8s_objects import JsonObject
from mecbench.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    MecbenchError,
    Unavailable,
)
from mecbench.core.logging import get_logger
from mecbench.v1 import sut_agent_pb2

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = get_logger("mecbench.controller.kubernetes")
T = TypeVar("T")
# The controller's pod, from the downward API (deploy/base/controller.yaml).
CONTROLLER_POD_ENV = "MECBENCH_K8S_CONTROLLER_POD_NAME"
CONTROLLER_POD_UID_ENV = "MECBENCH_K8S_CONTROLLER_POD_UID"
# Mutual TLS for the agent pods (deploy/base/controller.yaml, docs/kubernetes.md).
AGENT_TLS_SECRET_ENV = "MECBENCH_K8S_AGENT_TLS_SECRET"
AGENT_IDENTITY_ENV = "MECBENCH_K8S_AGENT_IDENTITY"
CONTROLLER_IDENTITY_ENV = "MECBENCH_K8S_CONTROLLER_IDENTITY"
CLUSTER_DOMAIN_ENV = "MECBENCH_K8S_CLUSTER_DOMAIN"
LOADGEN_CPU_ENV = "MECBENCH_K8S_LOADGEN_CPU_CORES"
LOADGEN_MEMORY_ENV = "MECBENCH_K8S_LOADGEN_MEMORY_BYTES"
# Cluster SUTs: the ports each cluster runtime's members talk to each other on, for the NetworkPolicy
# between them (`ray=6379,8076-8077;other=*`); a runtime not named here: every port, members only.
CLUSTER_PORTS_ENV = "MECBENCH_K8S_CLUSTER_PORTS"
# Kinds whose pods are made by a controller of the cluster (and go with it): never deleted one by one.
_POD_CONTROLLERS = frozenset({"Job", "StatefulSet", "LeaderWorkerSet"})

# Waiting reasons of a container that will not start without someone changing something: the
# kubelet keeps retrying, but a benchmark should say why at once rather than wait out a timeout.
# ErrImagePull is not one: a registry hiccup clears on the next pull, and a pull that keeps
# failing turns into ImagePullBackOff right after the first failure.
FATAL_WAITING_REASONS = frozenset({
    "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError", "CrashLoopBackOff",
})
# Waiting reasons that busy nodes give for a while and then get past (a runtime timing out under
# load, a volume not yet there): fatal only when they last (KubernetesConfig.container_error_grace_s).
TRANSIENT_WAITING_REASONS = frozenset({"CreateContainerError", "RunContainerError"})
# Events that say a node is being added for an unschedulable pod (the cluster autoscaler's, about
# 10 s after the pod; Karpenter nominates a node claim): it may yet run. The autoscaler's "no"
# ends the wait at once; with neither, the wait gives it KubernetesConfig.unschedulable_grace_s.
SCALE_UP_REASONS = frozenset({"TriggeredScaleUp", "Nominated"})
NO_SCALE_UP_REASONS = frozenset({"NotTriggerScaleUp"})
EVENTS_SHOWN = 8
LOG_LINES_SHOWN = 20


class ClusterApiError(Exception):
    """The API server refused a request (or could not be reached: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED or BOOKMARK
    object: JsonObject


@dataclass(frozen=True)
class Listing:
    items: list[JsonObject]
    resource_version: str


class ClusterApi(Protocol):
    """The part of the Kubernetes API the backend uses. Kinds: Pod, Service, ConfigMap, Event,
    Job, StatefulSet, NetworkPolicy, LeaderWorkerSet (namespaced; the last a CRD, where installed),
    Node, Namespace (cluster-scoped: namespace ""). Objects are JSON dicts."""

    def served_kinds(self, group_version: str) -> list[str]:
        """The kinds the API server serves under `group_version` (discovery: `/apis/<group>/<version>`);
        [] when it serves none (a CRD that is not installed: 404)."""
        ...

    def create(self, kind: str, namespace: str, body: JsonObject) -> JsonObject: ...

    def get(self, kind: str, namespace: str, name: str) -> JsonObject: ...

    def list(self, kind: str, namespace: str, label_selector: str = "", field_selector: str = "") -> Listing: ...

    def patch(self, kind: str, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        """A JSON merge patch."""
        ...

    def delete(self, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        """Delete; 404 (ClusterApiError) when it is not there."""
        ...

    def watch(
        self,
        kind: str,
        namespace: str,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str = "",
        timeout_s: float = 60.0,
    ) -> Iterator[WatchEvent]:
        """Changes after `resource_version` in order, until `timeout_s` passes (the iterator then
        ends). A version too old to replay raises ClusterApiError 410: list again."""
        ...

    def read_log(
        self, namespace: str, pod: str, container: str = "", follow: bool = False, tail_lines: int = 0
    ) -> Iterator[bytes]: ...


# --- the real API ------------------------------------------------------------------------------

_KINDS: dict[str, tuple[str, str, bool]] = {
    # kind: (API prefix, resource, namespaced)
    "Pod": ("/api/v1", "pods", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Event": ("/api/v1", "events", True),
    "Node": ("/api/v1", "nodes", False),
    "Namespace": ("/api/v1", "namespaces", False),
    "Job": ("/apis/batch/v1", "jobs", True),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "LeaderWorkerSet": (f"/apis/{objects.LWS_API_VERSION}", "leaderworkersets", True),
}


def _path(kind: str, namespace: str, name: str = "") -> str:
    prefix, resource, namespaced = _KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{resource}" if namespaced else f"{prefix}/{resource}"
    return f"{path}/{name}" if name else path


class KubernetesApi:
    """ClusterApi over the official client's REST layer. The client's typed models are skipped:
    bodies go out as the JSON dicts they were built as (what kubernetes-validate checked), and
    come back as JSON, exactly what the fake returns."""

    def __init__(self, api_client: ApiClient, request_timeout_s: float = 30.0) -> None:
        self._client = api_client
        self._timeout = request_timeout_s

    @classmethod
    def connect(cls, kubeconfig: str = "", context: str = "") -> KubernetesApi:
        """In-cluster configuration (the pod's service account) when `kubeconfig` is "", else
        that kubeconfig file (and context)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if kubeconfig:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=kubeconfig, context=context or None, client_configuration=configuration
                )
            else:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as exc:
            where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
            raise FailedPrecondition(f"cannot configure the Kubernetes client from {where}: {exc}") from None
        return cls(client.ApiClient(configuration))

    def _request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: JsonObject | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        serialized = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or None,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        url_method, url, headers, payload, post = serialized
        try:
            response = self._client.call_api(
                url_method, url, header_params=headers, body=payload, post_params=post,
                _request_timeout=timeout if timeout is not None else self._timeout,
            )
        except ApiException as exc:
            raise _api_error(exc.status or 0, exc.reason or "", exc.body) from None
        except Exception as exc:  # noqa: BLE001 - urllib3's connection errors have no common base worth naming
            raise ClusterApiError(0, "Unreachable", f"{type(exc).__name__}: {exc}") from None
        raw: Any = response
        if not 200 <= raw.status < 300:
            raise _api_error(raw.status, raw.reason or "", raw.read())
        return raw

    def _json(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        response = self._request(method, path, **kwargs)
        data: JsonObject = json.loads(response.read() or b"{}")
        return data

    def create(self, kind: str, namespace: str, body: JsonObject) -> JsonObject:
        return self._json("POST", _path(kind, namespace), body=body)

    def served_kinds(self, group_version: str) -> list[str]:
        path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        try:
            data = self._json("GET", path)
        except ClusterApiError as exc:
            if exc.status == 404:
                return []
            raise
        return [str(resource.get("kind", "")) for resource in data.get("resources") or []
                if "/" not in str(resource.get("name", ""))]

    def get(self, kind: str, namespace: str, name: str) -> JsonObject:
        return self._json("GET", _path(kind, namespace, name))

    def list(self, kind: str, namespace: str, label_selector: str = "", field_selector: str = "") -> Listing:
        query = _selectors(label_selector, field_selector)
        data = self._json("GET", _path(kind, namespace), query=query)
        items = data.get("items") or []
        for item in items:
            # A list's items carry no kind of their own.
            item.setdefault("kind", kind)
        return Listing(items, str(data.get("metadata", {}).get("resourceVersion", "")))

    def patch(self, kind: str, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        return self._json(
            "PATCH", _path(kind, namespace, name), body=patch, content_type="application/merge-patch+json"
        )

    def delete(self, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        self._request("DELETE", _path(kind, namespace, name), body=body).read()

    def watch(
        self,
        kind: str,
        namespace: str,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str = "",
        timeout_s: float = 60.0,
    ) -> Iterator[WatchEvent]:
        query = _selectors(label_selector, field_selector)
        query += [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(max(1, int(timeout_s))))]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        # The server ends the watch after timeoutSeconds; the read timeout only guards a dead link.
        response = self._request("GET", _path(kind, namespace), query=query, timeout=(10.0, timeout_s + 30.0))
        with _streamed(response.response, "watch"):
            for line in _lines(response.response.stream(65536)):
                try:
                    event = json.loads(line)
                except ValueError:
                    raise ClusterApiError(0, "StreamBroken", f"watch: not a JSON event: {line[:200]!r}") from None
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise ClusterApiError(
                        int(status.get("code", 500)), str(status.get("reason", "")), str(status.get("message", ""))
                    )
                yield WatchEvent(str(event.get("type")), event.get("object") or {})

    def read_log(
        self, namespace: str, pod: str, container: str = "", follow: bool = False, tail_lines: int = 0
    ) -> Iterator[bytes]:
        query: list[tuple[str, str]] = []
        if container:
            query.append(("container", container))
        if follow:
            query.append(("follow", "true"))
        if tail_lines:
            query.append(("tailLines", str(tail_lines)))
        timeout = (10.0, 24 * 3600.0) if follow else self._timeout
        response = self._request("GET", f"{_path('Pod', namespace, pod)}/log", query=query, timeout=timeout)
        with _streamed(response.response, "log"):
            yield from response.response.stream(65536)


@contextlib.contextmanager
def _streamed(response: Any, what: str) -> Iterator[None]:
    """Around reading a streamed reply (watch, log). A stream left before its end (the awaited
    event came, the caller stopped) still has unread bytes on its connection: returned to the pool
    as it is, the next request on it (a POST, which urllib3 does not retry) would fail. So the
    connection goes back only when the reply was read to its end, and is closed otherwise. A
    stream that breaks mid-way (the API server restarted, a proxy cut it) is ClusterApiError
    status 0, which the waits answer by listing and watching again."""
    finished = False
    try:
        yield
        finished = True
    except ClusterApiError:
        raise
    except GeneratorExit:
        raise
    except Exception as exc:  # noqa: BLE001 - urllib3's ProtocolError, ReadTimeoutError, OSError...
        raise ClusterApiError(0, "StreamBroken", f"{what} stream broke: {type(exc).__name__}: {exc}") from None
    finally:
        if not finished:
            response.close()
        response.release_conn()


def _selectors(label_selector: str, field_selector: str) -> list[tuple[str, str]]:
    query = []
    if label_selector:
        query.append(("labelSelector", label_selector))
    if field_selector:
        query.append(("fieldSelector", field_selector))
    return query


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line for line in complete if line.strip())
    if buffer.strip():
        yield buffer


def _api_error(status: int, reason: str, body: object) -> ClusterApiError:
    """The API server's Status object (reason, message) when the body holds one."""
    message = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        parsed = json.loads(message)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return ClusterApiError(status, str(parsed.get("reason") or reason), str(parsed.get("message") or message))
    return ClusterApiError(status, reason, message)


# --- reading pods ------------------------------------------------------------------------------


def _meta(obj: JsonObject) -> JsonObject:
    meta: JsonObject = obj.get("metadata") or {}
    return meta


def _name(obj: JsonObject) -> str:
    return str(_meta(obj).get("name", ""))


def _condition(pod: JsonObject, kind: str) -> JsonObject | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            found: JsonObject = condition
            return found
    return None


def pod_is_ready(pod: JsonObject) -> bool:
    status = pod.get("status") or {}
    ready = _condition(pod, "Ready")
    return (
        status.get("phase") == "Running"
        and ready is not None
        and ready.get("status") == "True"
        and not _meta(pod).get("deletionTimestamp")
    )


def pod_is_running(pod: JsonObject) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not _meta(pod).get("deletionTimestamp")


@dataclass(frozen=True)
class PodProblem:
    """Why a pod will not become ready by itself: reason (ImagePullBackOff, Unschedulable, ...)."""

    reason: str
    message: str
    crashed_container: str = ""
    # A state busy nodes get past (TRANSIENT_WAITING_REASONS): a problem only when it lasts.
    transient: bool = False
    container: str = ""


def pod_problem(pod: JsonObject) -> PodProblem | None:
    status = pod.get("status") or {}
    phase = status.get("phase")
    if _meta(pod).get("deletionTimestamp"):
        return PodProblem("Terminating", "the pod is being deleted")
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    if phase in ("Failed", "Succeeded"):
        for container in statuses:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated and (terminated.get("exitCode") or phase == "Succeeded"):
                detail = terminated.get("message") or ""
                return PodProblem(
                    str(terminated.get("reason") or phase),
                    f"container {container.get('name')} exited with code {terminated.get('exitCode')}"
                    + (f": {detail}" if detail else ""),
                    str(container.get("name", "")),
                )
        return PodProblem(str(status.get("reason") or phase), str(status.get("message") or f"the pod is {phase}"))
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING_REASONS:
            crashed = str(container.get("name", "")) if waiting.get("reason") == "CrashLoopBackOff" else ""
            return PodProblem(str(waiting["reason"]), str(waiting.get("message") or ""), crashed)
    if (pod.get("spec") or {}).get("restartPolicy") == "Never":
        # One container ended while another lives: the pod stays Running, but a dead server
        # sidecar (or agent) is never restarted and the pod can never be ready.
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated:
                detail = terminated.get("message") or ""
                return PodProblem(
                    str(terminated.get("reason") or "ContainerExited"),
                    f"container {container.get('name')} exited with code {terminated.get('exitCode')}"
                    + (f": {detail}" if detail else ""),
                    str(container.get("name", "")),
                )
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in TRANSIENT_WAITING_REASONS:
            return PodProblem(str(waiting["reason"]), str(waiting.get("message") or ""), transient=True,
                              container=str(container.get("name", "")))
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return PodProblem("Unschedulable", str(scheduled.get("message") or ""))
    return None


def _event_time(event: JsonObject) -> str:
    return str(
        event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
        or _meta(event).get("creationTimestamp") or ""
    )


def format_events(events: list[JsonObject], limit: int = EVENTS_SHOWN) -> str:
    """`Warning FailedScheduling: 0/3 nodes are available: ...; Normal Pulling: ...`, oldest first."""
    shown = sorted(events, key=_event_time)[-limit:]
    parts = []
    for event in shown:
        count = int(event.get("count") or 1)
        repeat = f" (x{count})" if count > 1 else ""
        message = str(event.get("message", "")).strip()
        parts.append(f"{event.get('type', 'Normal')} {event.get('reason', '')}: {message}{repeat}")
    return "; ".join(parts)


# --- the backend -------------------------------------------------------------------------------


def _cluster_ports_env() -> dict[str, list[objects.PortRange] | None]:
    try:
        return objects.parse_cluster_ports(os.environ.get(CLUSTER_PORTS_ENV, ""))
    except ValueError as exc:
        raise FailedPrecondition(
            f"{CLUSTER_PORTS_ENV}: {exc} (expected runtime=ports;... with ports like 6379,10002-10100 or *)"
        ) from None


@dataclass
class KubernetesConfig:
    namespace: str = "mecbench"
    image: str = "ghcr.io/mecbench/mecbench:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # The agents' pods run under it; it needs no API rights at all (deploy/base/rbac.yaml).
    service_account: str = "mecbench-agent"
    node_agent_selector: str = "app.kubernetes.io/name=mecbench,app.kubernetes.io/component=node-agent"
    ready_timeout_s: float = 300.0
    # How long an unschedulable pod waits for an autoscaler to say it is adding a node (the
    # cluster autoscaler posts TriggeredScaleUp some 10 s after the pod; NotTriggerScaleUp ends
    # the wait at once), and how long CreateContainerError/RunContainerError may last.
    unschedulable_grace_s: float = 30.0
    container_error_grace_s: float = 60.0
    # How often a wait looks again at a pod that did not change (for those grace periods).
    recheck_interval_s: float = 2.0
    # Expiry of every object made (renewed on the owner while this controller lives).
    ttl_s: float = 24 * 3600.0
    job_ttl_after_finished_s: int = 300
    # How long stop_agent and close wait for pods to be gone (GPUs freed) before moving on.
    delete_timeout_s: float = 60.0
    # The cluster's DNS domain for Service names; "" = `<service>.<namespace>.svc`, which the
    # pods' DNS search path completes whatever the domain is (not every cluster is cluster.local).
    cluster_domain: str = field(default_factory=lambda: os.environ.get(CLUSTER_DOMAIN_ENV, ""))
    # Each LoadGen agent's CPU and memory, requests equal to limits (Guaranteed QoS): a LoadGen
    # throttled or evicted as BestEffort in the middle of a benchmark measures itself.
    loadgen_cpu_cores: float = field(default_factory=lambda: float(os.environ.get(LOADGEN_CPU_ENV, "") or 1.0))
    loadgen_memory_bytes: int = field(
        default_factory=lambda: int(os.environ.get(LOADGEN_MEMORY_ENV, "") or 2 * 2**30)
    )
    # The pod's interface on its network (the CNI's), shaped on the SUT side.
    pod_interface: str = "eth0"
    gpu_runtime_class: str = ""
    store_secret: str = "mecbench-store"
    # This controller's name in owner objects and labels; "" = $HOSTNAME (its pod's name).
    controller: str = ""
    # Agents' container logs are followed into <log_dir>/<agent>.log; None = not collected.
    log_dir: Path | None = None
    # Renewal of the owner's expiry and the sweep run this often (and once at start).
    maintenance_interval_s: float = 300.0
    # The controller's own pod (downward API: metadata.name, metadata.uid); "" = not in a pod,
    # or $MECBENCH_K8S_CONTROLLER_POD_NAME / _UID. Its owner is tied to that pod: a successor
    # sweeps what a dead or restarted predecessor left (issue 20: restarts leave nothing behind).
    controller_pod: str = ""
    controller_pod_uid: str = ""
    # Mutual TLS for the agent pods made here: the Secret holding their certificate (tls.crt,
    # tls.key, ca.crt), "" = $MECBENCH_K8S_AGENT_TLS_SECRET, else plaintext (k8s_objects.tls_env).
    # The identities are the CN/SAN of the agents' and the controller's certificates.
    agent_tls_secret: str = field(default_factory=lambda: os.environ.get(AGENT_TLS_SECRET_ENV, ""))
    agent_identity: str = field(default_factory=lambda: os.environ.get(AGENT_IDENTITY_ENV, "") or "mecbench-agent")
    controller_identity: str = field(
        default_factory=lambda: os.environ.get(CONTROLLER_IDENTITY_ENV, "") or "mecbench-controller"
    )
    # Cluster SUTs: by runtime (SutCluster.runtime), the ports its members reach each other on,
    # the only ones the members' NetworkPolicy admits between them (None: every port, still only
    # from the cluster's own members). A runtime not named: every port between its members.
    cluster_ports: dict[str, list[objects.PortRange] | None] = field(default_factory=_cluster_ports_env)


@dataclass
class _Cluster:
    """A cluster SUT's objects, kept on its head's record."""

    names: objects.ClusterNames
    # Made as one LeaderWorkerSet (else a head Pod and StatefulSets of workers).
    lws: bool
    config: sut_agent_pb2.SutConfig
    # The workers' agent names, in the order of config.cluster.workers, once started.
    workers: list[str] = field(default_factory=list)


@dataclass
class _Deployed:
    handle: AgentHandle
    pod: str = ""
    pod_uid: str = ""
    service: str = ""
    job: str = ""
    # Node agents are found, not made: stopping one only forgets it.
    owned: bool = True
    # The instance label its pods carry (the pod's own name, or the Job's).
    instance: str = ""
    followers: list[threading.Thread] = field(default_factory=list)
    gpus: int = 0
    # A node agent asked for without a placement: the one beside the latest SUT (default_node).
    follows_sut: bool = False
    # Objects deleted with it before its own (a cluster head's worker sets, Services, policy).
    extra: list[tuple[str, str]] = field(default_factory=list)
    # Cluster SUTs: "head" or the worker's name; its DNS name for the other members; the head's
    # cluster. A member's pod is found by `pod_selector`, its cluster's pods by `gone_selector`.
    member: str = ""
    dns_host: str = ""
    cluster: _Cluster | None = None
    pod_selector: str = ""
    gone_selector: str = ""

    def selector(self) -> str:
        """The label selector of its (one) pod."""
        return self.pod_selector or f"{objects.LABEL_INSTANCE}={self.instance}"

    def all_pods_selector(self) -> str:
        """The label selector of every pod that goes when it is stopped."""
        return self.gone_selector or self.selector()


class KubernetesBackend(DeploymentBackend):
    name = "kubernetes"
    cluster_link_ends = 1  # the worker pod's interface (cluster_shaping_points)

    def __init__(
        self,
        api: ClusterApi,
        config: KubernetesConfig | None = None,
        clock: Callable[[], float] = time.time,
        maintain: bool = True,
    ) -> None:
        self.api = api
        self.config = config or KubernetesConfig()
        self.namespace = self.config.namespace
        self._clock = clock
        self._lock = threading.RLock()
        self._deployed: dict[str, _Deployed] = {}
        self._sut_order: list[str] = []
        self._closing = threading.Event()
        self.host = self.config.controller or os.environ.get("HOSTNAME", "") or "controller"
        self.controller = objects.dns_label(self.host, 30)
        pod_name = self.config.controller_pod or os.environ.get(CONTROLLER_POD_ENV, "")
        pod_uid = self.config.controller_pod_uid or os.environ.get(CONTROLLER_POD_UID_ENV, "")
        self.controller_pod = objects.OwnerRef(pod_name, pod_uid) if pod_name and pod_uid else None
        self._owner_name = ""  # none yet: the start sweep runs before this controller's owner exists
        self._lws: bool | None = None  # whether the LeaderWorkerSet CRD is served (asked once)
        # What this controller's predecessors left (a crash, an OOM kill, a stop that outlasted
        # its grace period) goes now, not when its expiry passes a day later holding GPUs.
        self.sweep(at_start=True)
        owner_name = objects.salted_name(self.controller, "owner", objects.new_salt())
        ctx = self._context(bootstrap_owner=owner_name)
        try:
            body = objects.owner_configmap(ctx, owner_name, self.controller, self.host, self.controller_pod)
            created = self.api.create("ConfigMap", self.namespace, body)
        except ClusterApiError as exc:
            raise FailedPrecondition(
                f"cannot create the owner ConfigMap in namespace {self.namespace} ({exc.status} {exc.reason}: "
                f"{exc.message}); is the namespace there and the controller's Role bound?"
            ) from None
        self.owner = objects.OwnerRef(owner_name, str(_meta(created).get("uid", "")))
        self._owner_name = owner_name
        self._maintainer: threading.Thread | None = None
        if maintain:
            self._maintainer = threading.Thread(target=self._maintain, name="k8s-maintenance", daemon=True)
            self._maintainer.start()
        log.info("kubernetes_backend_ready", namespace=self.namespace, owner=owner_name, image=self.config.image)

    # --- objects ---------------------------------------------------------------------------------

    def _context(self, bootstrap_owner: str = "") -> objects.ObjectContext:
        """What objects share; `bootstrap_owner` while the owner itself is made (it has no owner)."""
        return objects.ObjectContext(
            namespace=self.namespace,
            image=self.config.image,
            owner_label=bootstrap_owner or self.owner.name,
            expires_at=objects.rfc3339(self._clock() + self.config.ttl_s),
            owner=None if bootstrap_owner else self.owner,
            image_pull_policy=self.config.image_pull_policy,
            service_account=self.config.service_account,
            gpu_runtime_class=self.config.gpu_runtime_class,
            store_secret=self.config.store_secret,
            loadgen_cpu_cores=self.config.loadgen_cpu_cores,
            loadgen_memory_bytes=self.config.loadgen_memory_bytes,
            tls_secret=self.config.agent_tls_secret,
            tls_server_name=self.config.agent_identity,
            controller_identity=self.config.controller_identity,
        )

    def _create(self, kind: str, body: JsonObject, what: str) -> JsonObject:
        try:
            return self.api.create(kind, self.namespace, body)
        except ClusterApiError as exc:
            if exc.status == 409:
                raise AlreadyExists(f"{what}: {kind} {_name(body)} already exists") from None
            if exc.status in (400, 422):
                raise FailedPrecondition(f"{what}: the API server refused the {kind}: {exc.message}") from None
            if exc.status == 403:
                raise FailedPrecondition(
                    f"{what}: not allowed to create {kind}s in {self.namespace}: {exc.message}"
                ) from None
            raise Unavailable(f"{what}: creating the {kind} failed: {exc}") from None

    # --- starting agents -------------------------------------------------------------------------

    def start_agent(
        self, kind: AgentKind, name: str, env: dict[str, str] | None = None, placement: str = ""
    ) -> AgentHandle:
        if kind == AgentKind.NODE:
            return self._find_node_agent(name, placement)
        if kind == AgentKind.SUT:
            return self.start_sut_agent(name, sut_agent_pb2.SutConfig(env=env or {}), placement)
        if name.startswith("job-"):
            return self._start_loadgen_job(name, env or {})
        return self._start_loadgen_pod(name, env or {})

    def _reserve(self, record: _Deployed) -> None:
        """Record an agent before its objects exist, so close() removes them whatever happens."""
        if self._closing.is_set():
            raise Unavailable("the kubernetes backend is closed")
        name = record.handle.name
        with self._lock:
            existing = self._deployed.get(name)
        if existing is not None:
            if existing.owned and existing.pod and self.is_alive(name):
                raise AlreadyExists(f"agent {name!r} is already running")
            self.stop_agent(name)
        with self._lock:
            self._deployed[name] = record

    def _abandon(self, record: _Deployed) -> None:
        with self._lock:
            if self._deployed.get(record.handle.name) is record:
                del self._deployed[record.handle.name]
            if record.handle.name in self._sut_order:
                self._sut_order.remove(record.handle.name)
        self._delete_objects(record)
        # A pod that was scheduled holds its node's resources (a GPU) until it is gone; the
        # caller's next attempt should find them free.
        self._wait_pods_gone(record.all_pods_selector(), self.config.delete_timeout_s)

    def start_sut_agent(self, name: str, config: sut_agent_pb2.SutConfig, placement: str = "") -> AgentHandle:
        if objects.is_cluster(config):
            return self._start_cluster_head(name, config, placement)
        ctx = self._context()
        pod_name = objects.salted_name(objects.agent_scope("sut-", name), "sut", objects.new_salt())
        # Built (and checked) before anything is created: a bad config creates nothing.
        pod_body = objects.sut_pod(ctx, pod_name, name, config)
        service_body = objects.sut_service(ctx, pod_name, pod_name, name)
        domain = f".{self.config.cluster_domain}" if self.config.cluster_domain else ""
        address = f"{pod_name}.{self.namespace}.svc{domain}:{objects.GRPC_PORT}"
        handle = AgentHandle(name=name, kind=AgentKind.SUT, address=address, node="", placement=placement)
        record = _Deployed(handle, pod=pod_name, service=pod_name, instance=pod_name, gpus=config.gpus.count)
        self._reserve(record)
        what = f"SUT agent {name}"
        try:
            created = self._create("Pod", pod_body, what)
            record.pod_uid = str(_meta(created).get("uid", ""))
            self._create("Service", service_body, what)
            pod = self._wait_ready(what, record)
        except BaseException:
            self._abandon(record)
            raise
        self._started(record, pod, containers=["sut-agent", "server"] if objects.has_server_sidecar(config) else None)
        with self._lock:
            self._sut_order.append(name)
        return handle

    def _start_loadgen_pod(self, name: str, env: dict[str, str]) -> AgentHandle:
        ctx = self._context()
        pod_name = objects.salted_name(objects.agent_scope("loadgen-", name), "loadgen", objects.new_salt())
        body = objects.loadgen_pod(ctx, pod_name, name, env)
        handle = AgentHandle(name=name, kind=AgentKind.LOADGEN, address="", node="")
        record = _Deployed(handle, pod=pod_name, instance=pod_name)
        self._reserve(record)
        what = f"LoadGen agent {name}"
        try:
            created = self._create("Pod", body, what)
            record.pod_uid = str(_meta(created).get("uid", ""))
            pod = self._wait_ready(what, record)
        except BaseException:
            self._abandon(record)
            raise
        self._started(record, pod)
        return handle

    def _start_loadgen_job(self, name: str, env: dict[str, str]) -> AgentHandle:
        ctx = self._context()
        job_name = objects.salted_name(objects.agent_scope("job-", name), "job", objects.new_salt())
        body = objects.loadgen_job(
            ctx, job_name, name, env, active_deadline_s=max(1, int(self.config.ttl_s)),
            ttl_after_finished_s=self.config.job_ttl_after_finished_s,
        )
        handle = AgentHandle(name=name, kind=AgentKind.LOADGEN, address="", node="")
        record = _Deployed(handle, job=job_name, instance=job_name)
        self._reserve(record)
        what = f"LoadGen job {name}"
        try:
            self._create("Job", body, what)
            pod = self._wait_ready(what, record)
        except BaseException:
            self._abandon(record)
            raise
        self._started(record, pod)
        return handle

    def _started(self, record: _Deployed, pod: JsonObject, containers: list[str] | None = None) -> None:
        handle = record.handle
        record.pod = _name(pod)
        record.pod_uid = str(_meta(pod).get("uid", "")) or record.pod_uid
        handle.node = str((pod.get("spec") or {}).get("nodeName", ""))
        if handle.kind != AgentKind.SUT or record.member not in ("", "head"):
            # A worker of a cluster is dialled by the controller alone, at its pod's IP.
            handle.address = _address(str((pod.get("status") or {}).get("podIP", "")), objects.GRPC_PORT)
        handle.labels = {"namespace": self.namespace, "pod": record.pod, "uid": record.pod_uid}
        if record.member:
            handle.labels.update(member=record.member, host=record.dns_host)
        if record.service:
            handle.labels["service"] = record.service
        if record.job:
            handle.labels["job"] = record.job
        if self.config.log_dir is not None:
            handle.log_path = self.config.log_dir / f"{handle.name}.log"
            # The agent's own output goes where the local backend puts it; a sidecar server's beside it.
            for container in containers or [""]:
                path = handle.log_path
                if container not in ("", "sut-agent"):
                    path = handle.log_path.with_suffix(f".{container}.log")
                record.followers.append(self._follow_log(record.pod, container, path))
        log.info("agent_started", agent=handle.name, kind=handle.kind.value, pod=record.pod, node=handle.node,
                 address=handle.address)

    # --- waiting -----------------------------------------------------------------------------

    def _follow_pods(
        self,
        what: str,
        selector: str,
        deadline: float,
        on_list: Callable[[list[JsonObject]], T | None],
        on_event: Callable[[WatchEvent], T | None],
        stop_on_close: bool = True,
        recheck: Callable[[], T | None] | None = None,
    ) -> T | None:
        """List the pods matching `selector`, then watch them from that list's version, until
        `on_list` or `on_event` returns something (returned), the deadline passes or the backend
        closes (None). A watch too far behind (410), a stream that breaks mid-way, an API server
        restarting or throttling (status 0, 429, 5xx) is answered by listing and watching again,
        as a real API server's clients must; only a refusal (403, 404, ...) ends the wait."""
        version = ""
        backoff = 0.1
        closing = self._closing if stop_on_close else threading.Event()
        while time.monotonic() < deadline and not closing.is_set():
            try:
                if not version:
                    listing = self.api.list("Pod", self.namespace, label_selector=selector)
                    found = on_list(listing.items)
                    if found is not None:
                        return found
                    version = listing.resource_version
                # With a recheck, the watch is renewed every few seconds so the recheck runs
                # while nothing changes (a grace period ending is no event).
                window = deadline - time.monotonic()
                if recheck is not None:
                    window = min(window, self.config.recheck_interval_s)
                started, events = time.monotonic(), 0
                for event in self.api.watch(
                    "Pod", self.namespace, label_selector=selector, resource_version=version,
                    timeout_s=max(0.001, window),
                ):
                    events += 1
                    version = str(_meta(event.object).get("resourceVersion", version)) or version
                    if event.type == "BOOKMARK":
                        continue  # only its resourceVersion matters: where to watch from next time
                    found = on_event(event)
                    if found is not None:
                        return found
                    if closing.is_set() or time.monotonic() >= deadline:
                        return None
                if recheck is not None and (found := recheck()) is not None:
                    return found
                if not events and time.monotonic() - started < window / 2:
                    # A watch that ends at once with nothing to say (a proxy, a misbehaving server)
                    # is not followed by another at once, and another...
                    closing.wait(max(0.0, min(backoff, deadline - time.monotonic())))
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
            except ClusterApiError as exc:
                if exc.status == 410:
                    # The watch fell too far behind (history compacted): list again, watch from there.
                    version = ""
                    continue
                if exc.status not in (0, 429) and exc.status < 500:
                    raise Unavailable(f"{what}: watching its pods failed: {exc}") from None
                log.warning("watch_interrupted", what=what, error=str(exc))
                version = ""
                closing.wait(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(backoff * 2, 5.0)
        return None

    def _wait_ready(self, what: str, record: _Deployed, deadline: float | None = None) -> JsonObject:
        """Watch the agent's pod until it is Ready; fail at once when it cannot start, and after
        the ready timeout (or by `deadline`) otherwise, with the pod's state and recent events."""
        selector = record.selector()
        timeout = self.config.ready_timeout_s
        deadline = time.monotonic() + timeout if deadline is None else deadline
        last: JsonObject | None = None
        # Since when a problem that may clear by itself has been seen (reason, container).
        since: dict[tuple[str, str], float] = {}

        def judge(pod: JsonObject) -> JsonObject | None:
            nonlocal last
            last = pod
            if pod_is_ready(pod):
                return pod
            problem = pod_problem(pod)
            if problem is None:
                since.clear()
                return None
            key = (problem.reason, problem.container)
            first = since.setdefault(key, time.monotonic())
            for other in [k for k in since if k != key]:
                del since[other]
            if problem.reason == "Unschedulable":
                scale = self._scale_up_state(pod)
                if scale == "triggered":
                    return None
                if scale == "" and time.monotonic() - first < self.config.unschedulable_grace_s:
                    return None  # the autoscaler's word may come yet
            elif problem.transient and time.monotonic() - first < self.config.container_error_grace_s:
                return None
            raise self._start_failure(what, record, pod, problem)

        def recheck() -> JsonObject | None:
            # Nothing changed on the pod: a problem given time may have had its time.
            return judge(last) if last is not None and since else None

        def listed(pods: list[JsonObject]) -> JsonObject | None:
            for pod in pods:
                if judge(pod) is not None:
                    return pod
            return None

        def changed(event: WatchEvent) -> JsonObject | None:
            if event.type == "DELETED":
                raise Unavailable(f"{what}: pod {_name(event.object)} was deleted before it was ready"
                                  + self._events_suffix(record, event.object))
            return judge(event.object)

        ready = self._follow_pods(what, selector, deadline, listed, changed, recheck=recheck)
        if ready is not None:
            return ready
        if self._closing.is_set():
            raise Unavailable(f"{what}: the kubernetes backend closed while it started")
        state = _pod_state(last) if last is not None else "no pod was created"
        raise DeadlineExceeded(
            f"{what} was not ready within {timeout:g}s ({state})" + self._events_suffix(record, last)
        )

    def _scale_up_state(self, pod: JsonObject) -> str:
        """"triggered" when a node is being added for the pod, "refused" when the autoscaler
        said it will not add one, "" when nothing has said either (yet). The latest word counts."""
        events = sorted(self._events_of(_name(pod)), key=_event_time)
        for event in reversed(events):
            if event.get("reason") in SCALE_UP_REASONS:
                return "triggered"
            if event.get("reason") in NO_SCALE_UP_REASONS:
                return "refused"
        return ""

    def _start_failure(self, what: str, record: _Deployed, pod: JsonObject, problem: PodProblem) -> MecbenchError:
        message = f"{what} cannot start (pod {_name(pod)}): {problem.reason}: {problem.message}".rstrip(": ")
        if problem.reason == "Unschedulable" and record.gpus:
            message += self._gpu_capacity()
        if problem.crashed_container:
            tail = self._log_tail(_name(pod), problem.crashed_container)
            if tail:
                message += f"; last output: {tail}"
        message += self._events_suffix(record, pod)
        log.warning("agent_start_failed", agent=record.handle.name, pod=_name(pod), reason=problem.reason)
        return FailedPrecondition(message)

    def _events_of(self, name: str) -> list[JsonObject]:
        if not name:
            return []
        try:
            return self.api.list("Event", self.namespace, field_selector=f"involvedObject.name={name}").items
        except ClusterApiError:
            return []

    def _events_suffix(self, record: _Deployed, pod: JsonObject | None) -> str:
        names = [record.job] if record.job else []
        names.append(_name(pod) if pod is not None else record.pod)
        events = [event for name in names for event in self._events_of(name)]
        return f"; events: {format_events(events)}" if events else "; no events"

    def _gpu_capacity(self) -> str:
        """Allocatable GPUs per node, to tell "none in the cluster" from "all in use"."""
        try:
            nodes = self.api.list("Node", "").items
        except ClusterApiError:
            return ""
        counts = [
            f"{_name(node)}={(node.get('status') or {}).get('allocatable', {}).get(objects.GPU_RESOURCE, '0')}"
            for node in nodes
        ]
        return f" (allocatable {objects.GPU_RESOURCE} by node: {', '.join(counts)})" if counts else ""

    def _log_tail(self, pod: str, container: str) -> str:
        try:
            data = b"".join(self.api.read_log(self.namespace, pod, container, tail_lines=LOG_LINES_SHOWN))
        except ClusterApiError:
            return ""
        lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-3:])[:1000]

    # --- logs --------------------------------------------------------------------------------

    def _follow_log(self, pod: str, container: str, path: Path) -> threading.Thread:
        """Append the container's output to `path` while the pod lives: run.py's per-repeat log
        marks read agent logs from files, whichever backend runs the agent."""

        def follow() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with path.open("ab") as out:
                    for chunk in self.api.read_log(self.namespace, pod, container, follow=True):
                        out.write(chunk)
                        out.flush()
                        if self._closing.is_set():
                            return
            except (ClusterApiError, OSError) as exc:
                log.info("log_follow_ended", pod=pod, container=container, reason=str(exc))

        thread = threading.Thread(target=follow, name=f"log-{pod}", daemon=True)
        thread.start()
        return thread

    # --- node agents -------------------------------------------------------------------------

    def node_agents(self) -> dict[str, AgentHandle]:
        """The ready node agents by node name, from the DaemonSet's pods (label selector)."""
        listing = self.api.list("Pod", self.namespace, label_selector=self.config.node_agent_selector)
        return {handle.node: handle for pod in listing.items if (handle := self._node_handle(pod)) is not None}

    def _node_handle(self, pod: JsonObject, name: str = "") -> AgentHandle | None:
        spec = pod.get("spec") or {}
        node = str(spec.get("nodeName", ""))
        ip = str((pod.get("status") or {}).get("podIP", ""))
        if not pod_is_ready(pod) or not node or not ip:
            return None
        port = objects.GRPC_PORT
        for container in spec.get("containers") or []:
            for entry in container.get("ports") or []:
                if entry.get("name") == "grpc":
                    port = int(entry["containerPort"])
        return AgentHandle(
            name=name or f"node-agent-{node}",
            kind=AgentKind.NODE,
            address=_address(ip, port),
            node=node,
            labels={"namespace": self.namespace, "pod": _name(pod), "uid": str(_meta(pod).get("uid", ""))},
        )

    def default_node(self) -> str:
        """Where the node agent without a placement is found: beside the latest SUT (shaping and
        GPU telemetry concern the SUT's node), or "" for any."""
        with self._lock:
            for name in reversed(self._sut_order):
                record = self._deployed.get(name)
                if record is not None and record.handle.node:
                    return record.handle.node
        return ""

    def _find_node_agent(self, name: str, placement: str) -> AgentHandle:
        """The node agent on node `placement` (default_node() when ""), waiting for it to be
        ready (a DaemonSet rolling) up to the ready timeout."""
        node = placement or self.default_node()
        selector = self.config.node_agent_selector
        deadline = time.monotonic() + self.config.ready_timeout_s

        def pick(pods: list[JsonObject]) -> AgentHandle | None:
            handles = [self._node_handle(pod, name) for pod in pods]
            found = [h for h in handles if h is not None and (not node or h.node == node)]
            return sorted(found, key=lambda h: h.node)[0] if found else None

        handle = self._follow_pods(
            "node agents", selector, deadline, pick,
            lambda event: pick([event.object]) if event.type in ("ADDED", "MODIFIED") else None,
        )
        if handle is None:
            where = f"on node {node}" if node else "on any node"
            raise DeadlineExceeded(
                f"no ready node agent {where} within {self.config.ready_timeout_s:g}s (pods in {self.namespace} "
                f"with {selector}); is the node-agent DaemonSet deployed (deploy/) and tolerated there?"
            )
        # Its placement is its node: whoever holds the handle (the run's shaping, clearing it at
        # the end) reaches this node's agent again, not whichever one is found first.
        handle.placement = handle.node
        with self._lock:
            self._deployed[name] = _Deployed(handle, pod=handle.labels["pod"], pod_uid=handle.labels["uid"],
                                             owned=False, instance="", follows_sut=not placement)
        return handle

    # --- cluster SUTs ---------------------------------------------------------------------------

    def _lws_available(self) -> bool:
        """Whether the API server serves LeaderWorkerSets (its CRD is installed), asked once."""
        if self._lws is None:
            try:
                self._lws = "LeaderWorkerSet" in self.api.served_kinds(objects.LWS_API_VERSION)
            except ClusterApiError as exc:
                log.warning("discovery_failed", group_version=objects.LWS_API_VERSION, error=str(exc))
                return False
        return self._lws

    def _controller_kinds(self) -> tuple[str, ...]:
        """Kinds whose objects make pods, swept and closed before the pods themselves."""
        return ("LeaderWorkerSet", "StatefulSet") if self._lws_available() else ("StatefulSet",)

    def _dns_name(self, pod: str, names: objects.ClusterNames) -> str:
        domain = f".{self.config.cluster_domain}" if self.config.cluster_domain else ""
        return f"{pod}.{names.members}.{self.namespace}.svc{domain}"

    def _start_cluster_head(self, name: str, config: sut_agent_pb2.SutConfig, placement: str) -> AgentHandle:
        """The head of a cluster SUT, returned once its pod is Ready; its workers come with
        start_sut_workers. One LeaderWorkerSet where the CRD is served and the workers share one
        placement (it makes the workers once the head is Ready), else a Pod beside a headless
        Service; either way with the head's Service and the members' NetworkPolicy."""
        ctx = self._context()
        names = objects.cluster_names(objects.agent_scope("sut-", name), objects.new_salt())
        objects.check_sut_config(config)
        lws = len(objects.worker_groups(config)) == 1 and self._lws_available()
        ports = self.config.cluster_ports.get(config.cluster.runtime)
        bodies: list[tuple[str, JsonObject]] = [
            ("NetworkPolicy", objects.members_network_policy(ctx, names, name, ports)),
            ("Service", objects.sut_service(ctx, names.base, names.base, name)),
        ]
        if lws:
            head_pod = names.leader_pod
            bodies.append(("LeaderWorkerSet", objects.leader_worker_set(ctx, names, name, config)))
            extra = [("LeaderWorkerSet", names.members), ("NetworkPolicy", names.members)]
        else:
            head_pod = names.base
            bodies.insert(1, ("Service", objects.members_service(ctx, names, name)))
            bodies.append(("Pod", objects.cluster_head_pod(ctx, names, name, config)))
            groups = len(objects.worker_groups(config))
            # Workers before the head, the last set first: stopped in reverse order of starting.
            extra = [("StatefulSet", names.worker_set(group)) for group in reversed(range(groups))]
            extra += [("Service", names.members), ("NetworkPolicy", names.members)]
        domain = f".{self.config.cluster_domain}" if self.config.cluster_domain else ""
        address = f"{names.base}.{self.namespace}.svc{domain}:{objects.GRPC_PORT}"
        handle = AgentHandle(name=name, kind=AgentKind.SUT, address=address, node="", placement=placement)
        kept = sut_agent_pb2.SutConfig()
        kept.CopyFrom(config)
        record = _Deployed(
            handle, pod=head_pod, service=names.base, instance=names.base, gpus=config.gpus.count, extra=extra,
            member="head", dns_host=self._dns_name(head_pod, names), cluster=_Cluster(names, lws, kept),
            gone_selector=f"{objects.LABEL_CLUSTER}={names.base}",
        )
        self._reserve(record)
        what = f"SUT agent {name} (cluster head)"
        try:
            for kind, body in bodies:
                created = self._create(kind, body, what)
                if kind == "Pod":
                    record.pod_uid = str(_meta(created).get("uid", ""))
            pod = self._wait_ready(what, record)
        except BaseException:
            self._abandon(record)
            raise
        self._started(record, pod)
        with self._lock:
            self._sut_order.append(name)
        log.info("cluster_head_started", agent=name, pod=record.pod, shape="LeaderWorkerSet" if lws else "StatefulSet",
                 workers=len(config.cluster.workers))
        return handle

    def start_sut_workers(self, name: str, config: sut_agent_pb2.SutConfig) -> list[AgentHandle]:
        """The workers of the cluster whose head is the agent `name` (start_sut_agent first), one
        handle per config.cluster.workers entry in order, named `<name>-<worker>`, returned once
        every worker pod is Ready. A worker that cannot start fails it naming the member; the
        workers' objects are then gone (with a LeaderWorkerSet, they go with the head)."""
        if not objects.is_cluster(config) or not config.cluster.workers:
            return []
        with self._lock:
            head = self._deployed.get(name)
        if head is None or head.cluster is None:
            raise FailedPrecondition(f"SUT agent {name} is not the head of a cluster this backend started")
        cluster = head.cluster
        names = cluster.names
        pods = names.worker_pods(cluster.config, cluster.lws)
        records: list[_Deployed] = []
        for index, worker in enumerate(cluster.config.cluster.workers):
            agent = f"{name}-{worker.name}"
            handle = AgentHandle(name=agent, kind=AgentKind.SUT, address="", node="")
            record = _Deployed(handle, pod=pods[index], instance=pods[index], gpus=worker.gpus.count,
                               member=worker.name, dns_host=self._dns_name(pods[index], names),
                               pod_selector=f"{objects.LABEL_STATEFULSET_POD}={pods[index]}")
            self._reserve(record)
            records.append(record)
        try:
            if not cluster.lws:
                ctx = self._context()
                for group in range(len(objects.worker_groups(cluster.config))):
                    body = objects.worker_statefulset(ctx, names, name, cluster.config, group)
                    self._create("StatefulSet", body, f"the workers of SUT agent {name}")
            # The head is Ready: the sets start every worker at once (a LeaderWorkerSet now, as
            # its LeaderReady startup policy says); one deadline for them all.
            deadline = time.monotonic() + self.config.ready_timeout_s
            ready = []
            for record in records:
                what = f"cluster member {record.member} (agent {record.handle.name})"
                ready.append(self._wait_ready(what, record, deadline))
        except BaseException:
            self._drop_workers(head, records)
            raise
        for record, pod in zip(records, ready, strict=True):
            self._started(record, pod)
        cluster.workers = [record.handle.name for record in records]
        log.info("cluster_workers_started", agent=name, workers=[(r.member, r.pod, r.handle.node) for r in records])
        return [record.handle for record in records]

    def stop_sut_workers(self, name: str, workers: list[AgentHandle]) -> None:
        """Stop the cluster's workers, the last first. StatefulSets are deleted orphaning their
        pods, which are then deleted one by one in reverse order (a set would replace them); a
        LeaderWorkerSet's workers are its own and go with it when the head is stopped."""
        with self._lock:
            head = self._deployed.get(name)
            records = [self._deployed.pop(w.name) for w in reversed(workers) if w.name in self._deployed]
        cluster = head.cluster if head is not None else None
        if cluster is not None and cluster.lws:
            return
        if cluster is not None:
            for group in reversed(range(len(objects.worker_groups(cluster.config)))):
                set_name = cluster.names.worker_set(group)
                with contextlib.suppress(ClusterApiError):
                    self.api.delete("StatefulSet", self.namespace, set_name, propagation="Orphan")
                if head is not None and ("StatefulSet", set_name) in head.extra:
                    head.extra.remove(("StatefulSet", set_name))
            cluster.workers = []
        for record in records:
            self._delete_objects(record)
        if cluster is not None:
            selector = f"{objects.LABEL_CLUSTER}={cluster.names.base},{objects.LABEL_MEMBER_ROLE}=worker"
            self._wait_pods_gone(selector, self.config.delete_timeout_s)
        log.info("cluster_workers_stopped", agent=name, workers=[r.member for r in records])

    def _drop_workers(self, head: _Deployed, records: list[_Deployed]) -> None:
        """After a failed start of the workers: nothing of them is left (their sets and pods;
        a LeaderWorkerSet's go with its head)."""
        with self._lock:
            for record in records:
                if self._deployed.get(record.handle.name) is record:
                    del self._deployed[record.handle.name]
        cluster = head.cluster
        if cluster is None or cluster.lws:
            return
        for group in range(len(objects.worker_groups(cluster.config))):
            with contextlib.suppress(ClusterApiError):
                self.api.delete("StatefulSet", self.namespace, cluster.names.worker_set(group),
                                propagation="Background")
        selector = f"{objects.LABEL_CLUSTER}={cluster.names.base},{objects.LABEL_MEMBER_ROLE}=worker"
        self._wait_pods_gone(selector, self.config.delete_timeout_s)

    def cluster_host(self, agent: AgentHandle) -> str:
        """The DNS name the other members reach a member at: `<pod>.<cluster>-m.<namespace>.svc`
        (hostname and subdomain under the members' headless Service), stable for the pod's life."""
        with self._lock:
            record = self._deployed.get(agent.name)
        if record is None or not record.dns_host:
            return agent.address.rsplit(":", 1)[0].strip("[]")
        return record.dns_host

    def agent_problem(self, name: str) -> str:
        """Why the agent is not alive ("" when it is, or it cannot be told): for a cluster member,
        which of its pod's states ended it."""
        with self._lock:
            record = self._deployed.get(name)
        if record is None or not record.pod:
            return f"agent {name} is not running"
        try:
            pod: JsonObject | None = self.api.get("Pod", self.namespace, record.pod)
        except ClusterApiError as exc:
            if exc.status != 404:
                return ""
            pod = None
        if record.member:
            return self._member_problem(record, pod)
        return "" if pod is not None and self.is_alive(name) else f"pod {record.pod} is not running"

    def cluster_shaping_points(self, index: int) -> list[ShapingPoint]:
        """The link between the cluster's head and its worker `index`, as ONE point: the worker
        pod's own interface (by pod UID, on its node), which carries everything the worker
        exchanges with the head and the other workers (both directions: egress and ingress there).
        The head's end cannot be had apart: its interface also carries the LoadGens' traffic (the
        run's own shaping point). [] while no cluster is deployed (asked again once it is)."""
        with self._lock:
            heads = [self._deployed[n] for n in self._sut_order if n in self._deployed and self._deployed[n].cluster]
            head = heads[-1] if heads else None
            workers = head.cluster.workers if head is not None and head.cluster is not None else []
            record = self._deployed.get(workers[index]) if 0 <= index < len(workers) else None
        if head is None:
            return []
        if len(heads) > 1:
            raise FailedPrecondition(
                f"{len(heads)} cluster SUTs are deployed; shaping a member link needs to know the run's own"
            )
        if record is None or not record.pod_uid:
            raise FailedPrecondition(f"no worker {index} of a cluster SUT is running on this backend")
        pod = PodRef(self.namespace, record.pod, record.pod_uid)
        return [ShapingPoint(self.config.pod_interface, "", pod=pod, node=record.handle.node)]

    def _member_problem(self, record: _Deployed, pod: JsonObject | None) -> str:
        """What makes a cluster member dead: its pod gone, replaced (a set's new pod is not the
        member that joined), ending, a container ended or restarted (its runtime process with it);
        for a worker also not Ready. The head, like any SUT, may be slow to answer its probe
        while a benchmark saturates it."""
        if pod is None:
            return f"pod {record.pod} was deleted"
        uid = str(_meta(pod).get("uid", ""))
        if record.pod_uid and uid != record.pod_uid:
            return f"pod {record.pod} was deleted and replaced by another (uid {uid})"
        if _meta(pod).get("deletionTimestamp"):
            return f"pod {record.pod} is being deleted"
        status = pod.get("status") or {}
        if status.get("phase") != "Running":
            return f"pod {record.pod} is {status.get('phase') or 'Pending'}" + (
                f": {status.get('reason')}" if status.get("reason") else "")
        for container in status.get("containerStatuses") or []:
            state = container.get("state") or {}
            last = (container.get("lastState") or {}).get("terminated") or state.get("terminated") or {}
            if state.get("terminated") or int(container.get("restartCount") or 0) > 0:
                how = "ended" if state.get("terminated") else "restarted"
                return (f"container {container.get('name')} of pod {record.pod} {how}"
                        f" ({last.get('reason') or 'exit code ' + str(last.get('exitCode', '?'))})")
        if record.member != "head" and not pod_is_ready(pod):
            return f"pod {record.pod} is not ready ({_pod_state(pod)})"
        return ""

    # --- placement and shaping ---------------------------------------------------------------

    def sut_address_for(self, sut: AgentHandle, client: int) -> str:
        # The Service's DNS name: stable across the pod's life, and both data-plane ports are on it.
        return sut.address

    def shaping_points(self, side: str, client: int) -> list[ShapingPoint]:
        with self._lock:
            suts = [self._deployed[name].handle for name in self._sut_order if name in self._deployed]
        if not suts:
            # Nothing to shape yet; a run asks again once its SUT is deployed.
            self._check_side(side)
            return []
        if len(suts) > 1:
            raise FailedPrecondition(
                f"{len(suts)} SUT pods are deployed; shaping needs to know the run's own (sut_shaping_points)"
            )
        return self.sut_shaping_points(side, client, suts[0])

    def sut_shaping_points(self, side: str, client: int, sut: AgentHandle) -> list[ShapingPoint]:
        """The SUT pod's own interface, resolved to its network namespace by the node agent of
        its node (by pod UID). One pod serves every client, so `client` does not matter."""
        self._check_side(side)
        with self._lock:
            record = self._deployed.get(sut.name)
        if record is None or not record.pod_uid:
            raise FailedPrecondition(f"SUT agent {sut.name} is not a pod this backend started")
        pod = PodRef(self.namespace, record.pod, record.pod_uid)
        return [ShapingPoint(self.config.pod_interface, "", pod=pod, node=record.handle.node)]

    @staticmethod
    def _check_side(side: str) -> None:
        if side != "sut":
            raise FailedPrecondition(
                "the kubernetes backend shapes the SUT pod's own interface only (side: sut, with direction "
                "egress, ingress or both); LoadGen pods are shared by clients or made per repeat, so no "
                "LoadGen-side interface belongs to one client for a whole run"
            )

    def needs_new_sut_agent(self, old: sut_agent_pb2.SutConfig, new: sut_agent_pb2.SutConfig) -> bool:
        """Image, args, env, resources, GPUs and node selector are the pod's: a change takes a
        new pod. A change of the backend's own settings is a restart inside the agent. A cluster's
        members are pods made for it: any change of the cluster takes new ones."""
        return (
            old.HasField("cluster") != new.HasField("cluster")
            or old.cluster.runtime != new.cluster.runtime
            or list(old.cluster.workers) != list(new.cluster.workers)
            or old.image != new.image
            or list(old.args) != list(new.args)
            or dict(old.env) != dict(new.env)
            or old.resources != new.resources
            or old.gpus != new.gpus
            or dict(old.node_selector) != dict(new.node_selector)
            or objects.has_server_sidecar(old) != objects.has_server_sidecar(new)
        )

    # --- stopping ----------------------------------------------------------------------------

    def stop_agent(self, name: str) -> None:
        with self._lock:
            record = self._deployed.pop(name, None)
            if name in self._sut_order:
                self._sut_order.remove(name)
        if record is None or not record.owned:
            return
        self._delete_objects(record)
        self._wait_pods_gone(record.all_pods_selector(), self.config.delete_timeout_s)
        log.info("agent_stopped", agent=name, pod=record.pod, job=record.job)

    def _delete_objects(self, record: _Deployed) -> None:
        targets = [*record.extra, ("Job", record.job), ("Service", record.service),
                   ("Pod", "" if record.job else record.pod)]
        for kind, name in targets:
            if not name:
                continue
            try:
                # Background: a Job's pods go with it (the API's default for Jobs orphans them).
                self.api.delete(kind, self.namespace, name, propagation="Background")
            except ClusterApiError as exc:
                if exc.status != 404:
                    log.warning("delete_failed", kind=kind, name=name, error=str(exc))

    def _wait_pods_gone(self, selector: str, timeout: float) -> bool:
        """Until no pod matches (a stopped SUT's GPU is free for the next one); False on timeout."""
        deadline = time.monotonic() + timeout
        remaining: set[str] = set()

        def listed(pods: list[JsonObject]) -> bool | None:
            remaining.clear()
            remaining.update(_name(pod) for pod in pods)
            return True if not remaining else None

        def changed(event: WatchEvent) -> bool | None:
            if event.type == "DELETED":
                remaining.discard(_name(event.object))
            elif event.type == "ADDED":
                remaining.add(_name(event.object))
            return True if not remaining else None

        try:
            # Not cut short by close(): close waits here for its own pods.
            gone = self._follow_pods("deletion", selector, deadline, listed, changed, stop_on_close=False)
        except Unavailable as exc:
            log.warning("wait_for_deletion_failed", selector=selector, error=str(exc))
            return False
        if gone is None:
            log.warning("pods_still_terminating", selector=selector, pods=sorted(remaining))
        return gone is not None

    # --- state -------------------------------------------------------------------------------

    def agents(self) -> list[AgentHandle]:
        with self._lock:
            records = list(self._deployed.values())
        try:
            mine = self.api.list("Pod", self.namespace, label_selector=f"{objects.LABEL_OWNER}={self.owner.name}")
            nodes = self.api.list("Pod", self.namespace, label_selector=self.config.node_agent_selector)
        except ClusterApiError as exc:
            raise Unavailable(f"listing pods failed: {exc}") from None
        running = {_name(pod) for pod in [*mine.items, *nodes.items] if pod_is_running(pod)}
        return [record.handle for record in records if record.pod in running]

    def is_alive(self, name: str) -> bool:
        with self._lock:
            record = self._deployed.get(name)
        if record is None or not record.pod:
            return False
        try:
            pod = self.api.get("Pod", self.namespace, record.pod)
        except ClusterApiError as exc:
            if exc.status == 404:
                return False
            # Cannot tell: an API hiccup must not read as a dead agent and abort a run.
            log.warning("liveness_unknown", agent=name, error=str(exc))
            return True
        if record.member:
            return not self._member_problem(record, pod)
        # An agent of ours is alive while its pod runs: a readiness probe timing out while a
        # benchmark saturates it is not death; a container of it that ended is (a dead server
        # sidecar is not restarted: restartPolicy Never). A node agent must be ready to be worth dialling.
        if record.owned and _ended_container(pod):
            return False
        if record.follows_sut and self.default_node() not in ("", record.handle.node):
            # The latest SUT is on another node now: this handle no longer leads to the node agent
            # that serves its telemetry and GPUs; the caller finds the right one again.
            return False
        return pod_is_running(pod) and (record.owned or pod_is_ready(pod))

    # --- expiry, sweep, close -----------------------------------------------------------------

    def _maintain(self) -> None:
        # Renewed well within the TTL, so a live owner never looks expired to another controller.
        interval = min(self.config.maintenance_interval_s, self.config.ttl_s / 4)
        while not self._closing.wait(interval):
            try:
                self.renew()
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - maintenance retries next round whatever failed
                log.warning("maintenance_failed", error=str(exc))

    def renew(self) -> None:
        """Push the owner's expiry forward: a live controller's objects are never swept."""
        expires = objects.rfc3339(self._clock() + self.config.ttl_s)
        self.api.patch("ConfigMap", self.namespace, self.owner.name,
                       {"metadata": {"annotations": {objects.ANNOTATION_EXPIRES_AT: expires}}})

    def _dead_owner(self, owner: JsonObject, now: float, at_start: bool) -> bool:
        """Whether an owner's controller is gone: its expiry passed; or it was tied to a
        controller pod that no longer exists (or is another pod of that name); or, at start, it
        was made by this very controller before a restart (same pod uid, or out of a cluster the
        same host and name): a controller never meets its own owner at start."""
        if _expired(owner, now):
            return True
        if _name(owner) == self._owner_name:
            return False
        data = owner.get("data") or {}
        pod, uid = str(data.get("pod", "")), str(data.get("podUid", ""))
        if at_start:
            if uid and self.controller_pod is not None and uid == self.controller_pod.uid:
                return True
            if not uid and self.controller_pod is None and data.get("host") == self.host:
                return True
        if pod and uid:
            try:
                found = self.api.get("Pod", self.namespace, pod)
            except ClusterApiError as exc:
                return exc.status == 404
            return str(_meta(found).get("uid", "")) != uid
        return False

    def sweep(self, at_start: bool = False) -> list[str]:
        """Delete what controllers that are gone left behind: MECBench-made objects (by label)
        of an owner that is dead (see _dead_owner), or whose own expiry passed while their owner
        is not a live controller's. Objects without the labels, fresh ones of no known owner, and
        those of a live owner are left alone. Returns "Kind/name"s."""
        now = self._clock()
        selector = objects.MANAGED_SELECTOR
        try:
            owners = self.api.list("ConfigMap", self.namespace, label_selector=selector).items
        except ClusterApiError as exc:
            log.warning("sweep_failed", error=str(exc))
            return []
        owners_seen = [
            cm for cm in owners
            if (_meta(cm).get("labels") or {}).get(objects.LABEL_COMPONENT) == objects.Component.OWNER
        ]
        # A controller known gone (its pod, or this one's predecessor) takes all its objects;
        # one that only let its expiry pass leaves objects that are fresh themselves.
        gone = {_name(cm) for cm in owners_seen if not _expired(cm, now) and self._dead_owner(cm, now, at_start)}
        live = {_name(cm) for cm in owners_seen if not _expired(cm, now)} - gone
        removed: list[str] = []
        for kind in ("ConfigMap", *self._controller_kinds(), "Job", "Service", "NetworkPolicy", "Pod"):
            try:
                items = owners if kind == "ConfigMap" else self.api.list(kind, self.namespace, selector).items
            except ClusterApiError as exc:
                log.warning("sweep_failed", kind=kind, error=str(exc))
                continue
            for obj in items:
                meta = _meta(obj)
                owner = (meta.get("labels") or {}).get(objects.LABEL_OWNER, "")
                if owner in live or _name(obj) in live:
                    continue
                if owner not in gone and _name(obj) not in gone and not _expired(obj, now):
                    continue
                if kind == "Pod" and _controlled(obj):
                    continue  # its Job or set is swept, and its pods go with it
                try:
                    self.api.delete(kind, self.namespace, _name(obj), propagation="Background")
                except ClusterApiError as exc:
                    if exc.status != 404:
                        log.warning("sweep_delete_failed", kind=kind, name=_name(obj), error=str(exc))
                    continue
                removed.append(f"{kind}/{_name(obj)}")
        if removed:
            log.info("swept_leftovers", objects=removed)
        return removed

    def close(self) -> None:
        """Delete every object this backend made: agents first, then the owner (the garbage
        collector takes whatever an interrupted start left), and wait for the pods to go."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            records = list(self._deployed.values())
            self._deployed.clear()
            self._sut_order.clear()
        for record in records:
            if record.owned:
                self._delete_objects(record)
        with contextlib.suppress(ClusterApiError):
            self.api.delete("ConfigMap", self.namespace, self.owner.name, propagation="Background")
        # Anything labelled as ours that the owner reference did not cover (made elsewhere, or
        # its reference lost) goes too.
        for kind in (*self._controller_kinds(), "Job", "Service", "NetworkPolicy", "Pod"):
            try:
                items = self.api.list(kind, self.namespace, f"{objects.LABEL_OWNER}={self.owner.name}").items
            except ClusterApiError:
                continue
            for obj in items:
                if kind == "Pod" and _controlled(obj):
                    continue
                with contextlib.suppress(ClusterApiError):
                    self.api.delete(kind, self.namespace, _name(obj), propagation="Background")
        self._wait_pods_gone(f"{objects.LABEL_OWNER}={self.owner.name}", self.config.delete_timeout_s)
        if self._maintainer is not None:
            self._maintainer.join(timeout=5)
        log.info("kubernetes_backend_closed", owner=self.owner.name)


def _controlled(pod: JsonObject) -> bool:
    """Whether a pod is a Job's or a set's, which deleting its controller takes with it."""
    return any(ref.get("kind") in _POD_CONTROLLERS for ref in _meta(pod).get("ownerReferences") or [])


def _expired(obj: JsonObject, now: float) -> bool:
    stamp = (_meta(obj).get("annotations") or {}).get(objects.ANNOTATION_EXPIRES_AT, "")
    moment = objects.parse_rfc3339(stamp) if stamp else None
    return moment is not None and moment <= now


def _ended_container(pod: JsonObject) -> str:
    """The name of a container of the pod that ended and will not be restarted, or ""."""
    if (pod.get("spec") or {}).get("restartPolicy") != "Never":
        return ""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if (container.get("state") or {}).get("terminated"):
            return str(container.get("name", "")) or "?"
    return ""


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _pod_state(pod: JsonObject) -> str:
    status = pod.get("status") or {}
    parts = [f"pod {_name(pod)} {status.get('phase', 'Pending')}"]
    ready = _condition(pod, "Ready")
    if ready is not None and ready.get("status") != "True":
        parts.append(f"not ready: {ready.get('reason') or ready.get('message') or 'probe failing'}")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            parts.append(f"{container.get('name')} waiting: {waiting.get('reason', '')}")
    return ", ".join(parts)


def open_kubernetes_backend(
    namespace: str,
    image: str,
    kubeconfig: str = "",
    **config: Any,
) -> KubernetesBackend:
    """The backend over the real API: in-cluster, or through `kubeconfig`."""
    api = KubernetesApi.connect(kubeconfig)
    return KubernetesBackend(api, KubernetesConfig(namespace=namespace, image=image, **config))
