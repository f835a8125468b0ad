"""The Kubernetes objects the cluster backend creates, built by pure functions as plain dicts in
the API's JSON shape (camelCase keys, quantities as strings). The same dict is sent to the API
server and checked by kubernetes-validate in the tests, so what is tested is what is sent.

Every object carries the MECBench labels (`app.kubernetes.io/name=mecbench`, its component, the
experiment or run it serves, the controller that owns it), an owner reference to the
controller's owner ConfigMap (deleting that one object garbage-collects the rest) and an
`mecbench.io/expires-at` annotation that the sweep reads for objects left behind.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from mecbench.core.errors import Violations
from mecbench.core.request_env import check_request_env
from mecbench.v1 import sut_agent_pb2

JsonObject = dict[str, Any]

# Every agent pod serves gRPC on one fixed port, so probes, Services and addresses need no
# discovery; the SUT agent's plain-TCP data plane gets a fixed port beside it for the Service.
GRPC_PORT = 50051
TCP_DATA_PLANE_PORT = 50052
TCP_DATA_PLANE_ENV = "MECBENCH_SUT_TCP_DATA_PLANE_PORT"

APP = "mecbench"
MANAGED_BY = "mecbench-controller"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_EXPERIMENT = "mecbench.io/experiment"
LABEL_OWNER = "mecbench.io/owner"
# Cluster SUTs (SutConfig.cluster): every member pod carries its cluster and its role in it.
LABEL_CLUSTER = "mecbench.io/cluster"
LABEL_MEMBER_ROLE = "mecbench.io/member-role"
# The StatefulSet controller names each of its pods in this label (LeaderWorkerSet's pods are
# StatefulSet pods too).
LABEL_STATEFULSET_POD = "statefulset.kubernetes.io/pod-name"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
ANNOTATION_EXPIRES_AT = "mecbench.io/expires-at"
ANNOTATION_AGENT = "mecbench.io/agent"
# What the sweep and close() select: objects this code made, never the ones deploy/ applies.
MANAGED_SELECTOR = f"{LABEL_NAME}={APP},{LABEL_MANAGED_BY}={MANAGED_BY}"

GPU_RESOURCE = "nvidia.com/gpu"
# The agents' image runs as this user (see the Dockerfile); set explicitly so an image built
# from it runs unprivileged too, whatever its USER line says.
AGENT_UID = 10001
# Long enough for an agent's graceful gRPC stop (5 s), short enough that a GPU is free again soon.
TERMINATION_GRACE_S = 10

_DNS_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_LABEL_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_JOB_ID_RE = re.compile(r"^(?P<run>.+)-r\d+-c\d+$")


class Component(StrEnum):
    SUT = "sut-agent"
    LOADGEN = "loadgen-agent"
    LOADGEN_JOB = "loadgen-job"
    # A worker of a cluster SUT (its head is the SUT agent).
    SUT_MEMBER = "sut-member"
    OWNER = "owner"


# --- names and labels --------------------------------------------------------------------------


def new_salt() -> str:
    return secrets.token_hex(3)


def dns_label(text: str, max_len: int = 63) -> str:
    """`text` as a DNS-1123 label fragment: lower case, [a-z0-9-], no dash at either end."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    cleaned = re.sub(r"-{2,}", "-", cleaned).strip("-")
    return cleaned[:max_len].rstrip("-") or "x"


def salted_name(scope: str, kind: str, salt: str, max_len: int = 63) -> str:
    """`mecbench-<scope>-<kind>-<salt>`, at most `max_len` (63) characters and a DNS-1035 label (a
    Service's name must be one), the scope shortened to fit. The salt keeps a redeployed agent's
    objects apart from a previous one's that may still be terminating."""
    fixed = len("mecbench-") + len(kind) + 1 + len(salt) + 1
    name = f"mecbench-{dns_label(scope, max_len - fixed)}-{kind}-{salt}"
    assert is_dns_label(name), name
    return name


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL_RE.match(name))


def label_value(text: str) -> str:
    """`text` as a valid label value (at most 63 of [A-Za-z0-9._-], alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        return False
    return bool(_LABEL_KEY_NAME_RE.match(name))


def valid_label_value(value: str) -> bool:
    return bool(_LABEL_VALUE_RE.match(value))


def agent_scope(prefix: str, agent_name: str) -> str:
    """What an agent's objects are named after: its name without the pool's kind prefix."""
    return agent_name.removeprefix(prefix) or agent_name


def experiment_of(agent_name: str) -> str:
    """The run (or deployed SUT) an agent serves, for the `mecbench.io/experiment` label: an
    ephemeral SUT `sut-run-<id>` and job-mode LoadGens `job-<id>-r<k>-c<i>` belong to run-<id>."""
    name = agent_name.removeprefix("sut-")
    if agent_name.startswith("job-"):
        match = _JOB_ID_RE.match(agent_name.removeprefix("job-"))
        name = f"run-{match.group('run')}" if match else agent_name
    return label_value(name) or "unnamed"


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


# --- shared context ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerRef:
    """The object every other one is owned by (a ConfigMap per controller)."""

    name: str
    uid: str


@dataclass(frozen=True)
class ObjectContext:
    """What every object the backend makes shares: where, whose, which image, for how long."""

    namespace: str
    image: str
    owner_label: str
    expires_at: str
    owner: OwnerRef | None = None
    image_pull_policy: str = "IfNotPresent"
    service_account: str = "mecbench-agent"
    # Set on pods that ask for GPUs ("nvidia" with the GPU operator's RuntimeClass); "" = none.
    gpu_runtime_class: str = ""
    # A Secret of MECBENCH_STORE_* variables LoadGen agents read s3:// datasets with; "" = none.
    store_secret: str = ""
    # Mutual TLS for every agent pod: a Secret with the agents' certificate (tls.crt, tls.key)
    # and the CA (ca.crt), as cert-manager writes it; "" = plaintext. Agents are dialled by IP or
    # Service name, so certificates are checked against `tls_server_name`, the agents' identity;
    # SUT agents take calls from the controller and LoadGen agents (that identity too), LoadGen
    # agents from the controller only.
    # Each LoadGen agent's CPU and memory (requests = limits: Guaranteed QoS); 0 = none.
    loadgen_cpu_cores: float = 0.0
    loadgen_memory_bytes: int = 0
    tls_secret: str = ""
    tls_server_name: str = "mecbench-agent"
    controller_identity: str = "mecbench-controller"


def _metadata(ctx: ObjectContext, name: str, component: Component, experiment: str, agent: str) -> JsonObject:
    meta: JsonObject = {
        "name": name,
        "namespace": ctx.namespace,
        "labels": _labels(ctx, name, component, experiment),
        "annotations": {ANNOTATION_EXPIRES_AT: ctx.expires_at, ANNOTATION_AGENT: agent},
    }
    if ctx.owner is not None:
        # Not a controller reference and no blockOwnerDeletion: the owner is a plain ConfigMap,
        # and blocking would need update rights on its finalizers that the Role does not grant.
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": ctx.owner.name, "uid": ctx.owner.uid}
        ]
    return meta


def _labels(ctx: ObjectContext, name: str, component: Component, experiment: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP,
        LABEL_COMPONENT: component.value,
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_EXPERIMENT: experiment,
        LABEL_OWNER: ctx.owner_label,
    }


def owner_configmap(ctx: ObjectContext, name: str, controller: str, host: str = "",
                    controller_pod: OwnerRef | None = None) -> JsonObject:
    """The per-controller owner: deleting it garbage-collects every object that names it. It
    records which controller made it: `host` (its pod's name in a cluster, its hostname outside)
    and, in a cluster, the controller's pod (name and uid, from the downward API), which it is
    owned by in turn: when that pod is deleted, the garbage collector takes everything."""
    meta = _metadata(ctx, name, Component.OWNER, "controller", controller)
    meta.pop("ownerReferences", None)
    data = {"controller": controller, "host": host or controller}
    if controller_pod is not None:
        data.update(pod=controller_pod.name, podUid=controller_pod.uid)
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": controller_pod.name, "uid": controller_pod.uid}
        ]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": data,
    }


# --- containers --------------------------------------------------------------------------------


TLS_MOUNT = "/etc/mecbench/tls"


def _grpc_probe(port: int, tls: bool = False) -> JsonObject:
    # Every MECBench server runs the standard gRPC health service; the kubelet asks it directly.
    # The kubelet's gRPC probe speaks plaintext only: a server with TLS would never be Ready, so
    # there the probe is that the port accepts connections.
    check: JsonObject = {"tcpSocket": {"port": port}} if tls else {"grpc": {"port": port}}
    return {**check, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 3}


def tls_env(ctx: ObjectContext, service: str, member: bool = False) -> dict[str, str]:
    """MECBENCH_TLS_* for an agent pod whose certificates are mounted from ctx.tls_secret. A
    cluster's worker (`member`) is a SUT agent that only the controller calls."""
    if not ctx.tls_secret:
        return {}
    env = {
        "MECBENCH_TLS_CERT": f"{TLS_MOUNT}/tls.crt",
        "MECBENCH_TLS_KEY": f"{TLS_MOUNT}/tls.key",
        "MECBENCH_TLS_CA": f"{TLS_MOUNT}/ca.crt",
        "MECBENCH_TLS_CLIENT_AUTH": "true",
        "MECBENCH_TLS_SERVER_NAME": ctx.tls_server_name,
    }
    if service == "sut-agent" and member:
        env["MECBENCH_SUT_TLS_ALLOWED_CLIENTS"] = ctx.controller_identity
    elif service == "sut-agent":
        env["MECBENCH_SUT_TLS_ALLOWED_CLIENTS"] = f"{ctx.controller_identity},{ctx.tls_server_name}"
    elif service == "loadgen-agent":
        env["MECBENCH_LOADGEN_TLS_ALLOWED_CLIENTS"] = ctx.controller_identity
    return env


def _env_list(env: dict[str, str]) -> list[JsonObject]:
    return [{"name": key, "value": value} for key, value in sorted(env.items())]


def _restricted_security_context() -> JsonObject:
    return {
        "runAsNonRoot": True,
        "runAsUser": AGENT_UID,
        "runAsGroup": AGENT_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _agent_container(ctx: ObjectContext, name: str, service: str, image: str, env: dict[str, str],
                     ports: list[JsonObject], member: bool = False) -> JsonObject:
    container: JsonObject = {
        "name": name,
        "image": image,
        "imagePullPolicy": ctx.image_pull_policy,
        # Named explicitly so an image built FROM the MECBench one runs the agent whatever its
        # ENTRYPOINT.
        "command": ["mecbench"],
        "args": [service, "--listen", f"0.0.0.0:{GRPC_PORT}"],
        "ports": ports,
        "readinessProbe": _grpc_probe(GRPC_PORT, tls=bool(ctx.tls_secret)),
        "securityContext": _restricted_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    # The operator's TLS settings win over anything else given for the agent.
    env = {**env, **tls_env(ctx, service, member)}
    if ctx.tls_secret:
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
    if env:
        container["env"] = _env_list(env)
    return container


def _pod_spec(ctx: ObjectContext, containers: list[JsonObject]) -> JsonObject:
    spec: JsonObject = {
        # A crashed agent is not restarted behind the controller's back: it would come back
        # without the configuration the controller gave it. The pod ends, is_alive says so.
        "restartPolicy": "Never",
        "serviceAccountName": ctx.service_account,
        # Agents never talk to the API server.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if ctx.tls_secret:
        # Not optional: an agent without its certificate would serve plaintext, or not at all.
        spec["volumes"].append({"name": "tls", "secret": {"secretName": ctx.tls_secret, "defaultMode": 0o444}})
    return spec


def _grpc_port() -> JsonObject:
    return {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}


# --- SUT ---------------------------------------------------------------------------------------


def cpu_quantity(cores: float) -> str:
    return f"{max(1, math.ceil(round(cores * 1000, 6)))}m"


def _resources(config: sut_agent_pb2.SutConfig | sut_agent_pb2.SutMember) -> JsonObject:
    """Requests equal to limits (Guaranteed QoS where both CPU and memory are given: a benchmark
    must not share what it measures). GPUs are a count for the device plugin."""
    amounts: dict[str, str] = {}
    if config.resources.cpu_cores > 0:
        amounts["cpu"] = cpu_quantity(config.resources.cpu_cores)
    if config.resources.memory_bytes > 0:
        amounts["memory"] = str(config.resources.memory_bytes)
    if config.gpus.count > 0:
        amounts[GPU_RESOURCE] = str(config.gpus.count)
    if not amounts:
        return {}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def check_sut_config(config: sut_agent_pb2.SutConfig, prefix: str = "sut") -> None:
    """What the cluster backend cannot do with a SutConfig, all at once (INVALID_ARGUMENT)."""
    violations = Violations()
    _check_placement(config, prefix, violations)
    if config.args and is_cluster(config):
        violations.add(
            f"{prefix}.args",
            "a cluster's head and workers run the SUT agent, which starts the runtime and the server from "
            "the cluster launch profile (cluster.runtime); no command line comes with the request",
        )
    elif config.args and not has_server_sidecar(config):
        violations.add(
            f"{prefix}.args",
            "args are the server's when sut.image runs an external server as a sidecar; "
            "the SUT agent's own command line is fixed",
        )
    for index, worker in enumerate(config.cluster.workers):
        _check_placement(worker, f"{prefix}.cluster.workers[{index}]", violations)
    # A request's environment reaches only the server, and never with a reserved name.
    check_request_env(config.env, f"{prefix}.env", (), violations)
    if config.image and (any(c.isspace() for c in config.image) or len(config.image) > 1024):
        violations.add(f"{prefix}.image", "not an image reference")
    violations.raise_if_any()


def _check_placement(config: sut_agent_pb2.SutConfig | sut_agent_pb2.SutMember, prefix: str,
                     violations: Violations) -> None:
    if config.gpus.uuids or config.gpus.indices:
        field = "uuids" if config.gpus.uuids else "indices"
        violations.add(
            f"{prefix}.gpus.{field}",
            "the kubernetes backend asks the device plugin for a number of GPUs (gpus.count); "
            "choose the kind of GPU with node_selector (e.g. nvidia.com/gpu.product)",
        )
    for key, value in config.node_selector.items():
        if not valid_label_key(key):
            violations.add(f"{prefix}.node_selector", f"{key!r} is not a Kubernetes label key")
        if not valid_label_value(value):
            violations.add(f"{prefix}.node_selector", f"{value!r} ({key}) is not a Kubernetes label value")


def is_cluster(config: sut_agent_pb2.SutConfig) -> bool:
    """A SUT of several members (a head and workers, SutConfig.cluster)."""
    return config.HasField("cluster")


def has_server_sidecar(config: sut_agent_pb2.SutConfig) -> bool:
    """An external backend with its own image: the server runs beside the agent in the pod and
    the agent forwards to it over localhost (`external.endpoint`). An external backend without an
    image is launched by the agent inside its own container from a launch profile. A cluster's
    agents start the runtime and the server themselves: its image is theirs, never a sidecar."""
    return config.WhichOneof("backend") == "external" and bool(config.image) and not is_cluster(config)


def _place(ctx: ObjectContext, spec: JsonObject, config: sut_agent_pb2.SutConfig | sut_agent_pb2.SutMember) -> None:
    """A pod's node selector and, when it asks for GPUs, their toleration and RuntimeClass."""
    if config.node_selector:
        spec["nodeSelector"] = dict(sorted(config.node_selector.items()))
    if config.gpus.count > 0:
        # GPU node pools are commonly tainted so that only pods asking for GPUs land there.
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        if ctx.gpu_runtime_class:
            spec["runtimeClassName"] = ctx.gpu_runtime_class


def sut_pod(ctx: ObjectContext, name: str, agent: str, config: sut_agent_pb2.SutConfig) -> JsonObject:
    check_sut_config(config)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(ctx, name, Component.SUT, experiment_of(agent), agent),
        "spec": _sut_pod_spec(ctx, config),
    }


def _sut_pod_spec(ctx: ObjectContext, config: sut_agent_pb2.SutConfig) -> JsonObject:
    sidecar = has_server_sidecar(config)
    # The agent's own environment is the operator's: config.env goes to the server only (the
    # sidecar below, or the process the agent launches, which gets it with the config).
    env: dict[str, str] = {}
    # Fixed, so the Service can expose it: SutStatus.tcp_data_plane_port reports this port.
    env[TCP_DATA_PLANE_ENV] = str(TCP_DATA_PLANE_PORT)
    agent_image = config.image if config.image and not sidecar else ctx.image
    ports = [_grpc_port(), {"name": "tcp-data", "containerPort": TCP_DATA_PLANE_PORT, "protocol": "TCP"}]
    agent_container = _agent_container(ctx, "sut-agent", "sut-agent", agent_image, env, ports)
    containers = [agent_container]
    resources = _resources(config)
    if sidecar:
        server: JsonObject = {
            "name": "server",
            "image": config.image,
            "imagePullPolicy": ctx.image_pull_policy,
            # Server images often run as root (vLLM, Triton): only privilege escalation is
            # refused; the image's user is its own business.
            "securityContext": {"allowPrivilegeEscalation": False},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
        if config.args:
            server["args"] = list(config.args)
        if config.env:
            server["env"] = _env_list(dict(config.env))
        if resources:
            server["resources"] = resources
        containers.append(server)
    elif resources:
        agent_container["resources"] = resources
    spec = _pod_spec(ctx, containers)
    _place(ctx, spec, config)
    return spec


def sut_service(ctx: ObjectContext, name: str, pod_name: str, agent: str) -> JsonObject:
    """The SUT pod's stable address: gRPC (control and data plane) and the plain-TCP data plane,
    each on the same port number as in the pod, since the agent reports its TCP port and a
    LoadGen dials it on the host of the address it was given."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ctx, name, Component.SUT, experiment_of(agent), agent),
        "spec": {
            "type": "ClusterIP",
            # The backend waits for the pod to be Ready before anyone is given this address; after
            # that, a health probe that times out while the SUT is saturated by a benchmark must
            # not take the SUT out of its own Service in the middle of the measurement.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_INSTANCE: pod_name},
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "tcp-data", "port": TCP_DATA_PLANE_PORT, "targetPort": "tcp-data", "protocol": "TCP"},
            ],
        },
    }


# --- cluster SUTs ------------------------------------------------------------------------------
#
# A cluster SUT (SutConfig.cluster) is a head and workers, each a SUT agent in a pod of its own;
# the agents start the runtime (Ray, ...) and the server from the operator's cluster launch profile.
# Two shapes, the same names and labels:
#
# - LeaderWorkerSet (where its CRD is installed and every worker asks for the same placement): one
#   object, size 1 + workers, whose leader is the head; `startupPolicy: LeaderReady` makes the
#   workers only once the head is Ready; `restartPolicy: None`, so a failed member fails the run
#   rather than being recreated behind the controller's back. Its headless Service is its own.
# - otherwise the head is a Pod as any SUT agent's and the workers are StatefulSets (one per
#   distinct placement, usually one), with a headless Service for all members.
#
# Either way each member is on a node of its own (required pod anti-affinity on the hostname), every
# member pod is `<pod>.<base>-m.<namespace>.svc` in DNS (hostname + subdomain),
# carries `mecbench.io/cluster=<base>` and `mecbench.io/member-role=head|worker`, and a
# NetworkPolicy admits member-to-member traffic only (on the runtime's ports where they are known).

# Room for "-m-0-<worker>" and for the StatefulSet controller's revision label `<set>-<10 hex>`
# (at most 63) on the pods of a set named after the base.
CLUSTER_NAME_MAX = 44
# The StatefulSet controller and LeaderWorkerSet need pods that restart; a restarted container
# of a member is a failed member all the same (the backend reads restartCount).
MEMBER_RESTART_POLICY = "Always"


@dataclass(frozen=True)
class ClusterNames:
    """The names of one cluster SUT's objects, all derived from `base`, the head's salted name
    (the head's Service, which LoadGens dial, and its pod's instance label)."""

    base: str

    @property
    def members(self) -> str:
        """The headless Service of every member (the LeaderWorkerSet's own, named after it), the
        NetworkPolicy, and the LeaderWorkerSet."""
        return f"{self.base}-m"

    @property
    def leader_pod(self) -> str:
        return f"{self.members}-0"

    def worker_set(self, group: int) -> str:
        return f"{self.base}-w{group}"

    def worker_pods(self, config: sut_agent_pb2.SutConfig, lws: bool) -> list[str]:
        """Each worker's pod name, in the order of config.cluster.workers."""
        if lws:
            return [f"{self.leader_pod}-{index + 1}" for index in range(len(config.cluster.workers))]
        pods = [""] * len(config.cluster.workers)
        for group, indices in enumerate(worker_groups(config)):
            for ordinal, index in enumerate(indices):
                pods[index] = f"{self.worker_set(group)}-{ordinal}"
        return pods


def cluster_names(scope: str, salt: str) -> ClusterNames:
    return ClusterNames(salted_name(scope, "sut", salt, CLUSTER_NAME_MAX))


def worker_groups(config: sut_agent_pb2.SutConfig) -> list[list[int]]:
    """The workers' indices grouped by identical placement (resources, GPUs, node selector), in
    order of first appearance: one pod template (a StatefulSet) per group."""
    groups: dict[bytes, list[int]] = {}
    for index, worker in enumerate(config.cluster.workers):
        shape = sut_agent_pb2.SutMember(resources=worker.resources, gpus=worker.gpus,
                                        node_selector=dict(worker.node_selector))
        groups.setdefault(shape.SerializeToString(deterministic=True), []).append(index)
    return list(groups.values())


def _member_labels(ctx: ObjectContext, instance: str, component: Component, experiment: str, names: ClusterNames,
                   role: str) -> dict[str, str]:
    return {**_labels(ctx, instance, component, experiment), LABEL_CLUSTER: names.base, LABEL_MEMBER_ROLE: role}


def _spread(spec: JsonObject, names: ClusterNames) -> None:
    """One member per node: a SUT that spans nodes, its members' traffic crossing the network
    between them (what tensor and pipeline parallelism over nodes is measured with)."""
    spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {LABEL_CLUSTER: names.base}}, "topologyKey": "kubernetes.io/hostname"},
    ]}}


def _template(ctx: ObjectContext, labels: dict[str, str], agent: str, spec: JsonObject) -> JsonObject:
    return {
        "metadata": {"labels": labels, "annotations": {ANNOTATION_AGENT: agent, ANNOTATION_EXPIRES_AT: ctx.expires_at}},
        "spec": spec,
    }


def cluster_head_pod(ctx: ObjectContext, names: ClusterNames, agent: str,
                     config: sut_agent_pb2.SutConfig) -> JsonObject:
    """The head without a LeaderWorkerSet: the SUT agent's pod, named in DNS under the members'
    headless Service (`<base>.<base>-m.<namespace>.svc`)."""
    pod = sut_pod(ctx, names.base, agent, config)
    pod["metadata"]["labels"].update({LABEL_CLUSTER: names.base, LABEL_MEMBER_ROLE: "head"})
    # DNS gives a pod a name under a headless Service only when its hostname is set explicitly
    # (the EndpointSlice carries `spec.hostname`; the StatefulSet controller sets its pods' own).
    pod["spec"]["hostname"] = names.base
    pod["spec"]["subdomain"] = names.members
    _spread(pod["spec"], names)
    return pod


def _worker_pod_spec(ctx: ObjectContext, config: sut_agent_pb2.SutConfig, worker: sut_agent_pb2.SutMember,
                     names: ClusterNames) -> JsonObject:
    """A worker's SUT agent: the cluster's image (it holds the runtime), no data plane (LoadGens
    reach the head only), only the controller admitted over TLS; placed by its SutMember."""
    image = config.image or ctx.image
    container = _agent_container(ctx, "sut-agent", "sut-agent", image, {}, [_grpc_port()], member=True)
    resources = _resources(worker)
    if resources:
        container["resources"] = resources
    spec = _pod_spec(ctx, [container])
    spec["restartPolicy"] = MEMBER_RESTART_POLICY
    _place(ctx, spec, worker)
    _spread(spec, names)
    return spec


def members_service(ctx: ObjectContext, names: ClusterNames, agent: str) -> JsonObject:
    """Without a LeaderWorkerSet: the headless Service that gives every member pod its stable
    DNS name, ready or not (members find each other before any of them serves)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ctx, names.members, Component.SUT_MEMBER, experiment_of(agent), agent),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_CLUSTER: names.base},
            "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}],
        },
    }


def worker_statefulset(ctx: ObjectContext, names: ClusterNames, agent: str, config: sut_agent_pb2.SutConfig,
                       group: int) -> JsonObject:
    """Workers `group` of worker_groups(config): as many replicas as workers of that placement,
    all started at once (Parallel: the head is already Ready when this is made)."""
    indices = worker_groups(config)[group]
    name = names.worker_set(group)
    experiment = experiment_of(agent)
    labels = _member_labels(ctx, name, Component.SUT_MEMBER, experiment, names, "worker")
    worker = config.cluster.workers[indices[0]]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(ctx, name, Component.SUT_MEMBER, experiment, agent),
        "spec": {
            "serviceName": names.members,
            "replicas": len(indices),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {LABEL_INSTANCE: name}},
            "template": _template(ctx, labels, agent, _worker_pod_spec(ctx, config, worker, names)),
        },
    }


def leader_worker_set(ctx: ObjectContext, names: ClusterNames, agent: str,
                      config: sut_agent_pb2.SutConfig) -> JsonObject:
    """The whole cluster as one LeaderWorkerSet (every worker of the same placement)."""
    check_sut_config(config)
    experiment = experiment_of(agent)
    head_labels = _member_labels(ctx, names.base, Component.SUT, experiment, names, "head")
    head_spec = _sut_pod_spec(ctx, config)
    head_spec["restartPolicy"] = MEMBER_RESTART_POLICY
    _spread(head_spec, names)
    worker_labels = _member_labels(ctx, f"{names.base}-w", Component.SUT_MEMBER, experiment, names, "worker")
    worker_spec = _worker_pod_spec(ctx, config, config.cluster.workers[0], names)
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": _metadata(ctx, names.members, Component.SUT, experiment, agent),
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderReady",
            "leaderWorkerTemplate": {
                "size": 1 + len(config.cluster.workers),
                "restartPolicy": "None",
                "leaderTemplate": _template(ctx, head_labels, agent, head_spec),
                "workerTemplate": _template(ctx, worker_labels, agent, worker_spec),
            },
            "networkConfig": {"subdomainPolicy": "Shared"},
        },
    }


PortRange = tuple[int, int]


def parse_port_ranges(text: str) -> list[PortRange] | None:
    """"6379,8076-8077" as [(6379, 6379), (8076, 8077)]; "*" (every port) as None."""
    if text.strip() == "*":
        return None
    ranges: list[PortRange] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"not a port or port range: {part.strip()!r}")
        ranges.append((first, last))
    if not ranges:
        raise ValueError("no ports")
    return ranges


def parse_cluster_ports(text: str) -> dict[str, list[PortRange] | None]:
    """MECBENCH_K8S_CLUSTER_PORTS: `runtime=ports;runtime=ports` (ports as parse_port_ranges)."""
    table: dict[str, list[PortRange] | None] = {}
    for entry in text.split(";"):
        if not entry.strip():
            continue
        runtime, sep, ports = entry.partition("=")
        if not sep or not runtime.strip():
            raise ValueError(f"not runtime=ports: {entry.strip()!r}")
        table[runtime.strip()] = parse_port_ranges(ports)
    return table


def members_network_policy(ctx: ObjectContext, names: ClusterNames, agent: str,
                           ports: list[PortRange] | None) -> JsonObject:
    """Member-to-member traffic of one cluster: from its own member pods only, on the runtime's
    ports (None: every port, still only between the members). The agents' own ports stay under
    deploy/'s policies (the controller; LoadGens reach the head)."""
    rule: JsonObject = {"from": [{"podSelector": {"matchLabels": {LABEL_CLUSTER: names.base}}}]}
    if ports is not None:
        rule["ports"] = [
            {"protocol": "TCP", "port": low, **({"endPort": high} if high > low else {})} for low, high in ports
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ctx, names.members, Component.SUT_MEMBER, experiment_of(agent), agent),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_CLUSTER: names.base}},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


# --- LoadGen -----------------------------------------------------------------------------------


def _loadgen_spec(ctx: ObjectContext, env: dict[str, str]) -> JsonObject:
    container = _agent_container(ctx, "loadgen-agent", "loadgen-agent", ctx.image, env, [_grpc_port()])
    amounts: dict[str, str] = {}
    if ctx.loadgen_cpu_cores > 0:
        amounts["cpu"] = cpu_quantity(ctx.loadgen_cpu_cores)
    if ctx.loadgen_memory_bytes > 0:
        amounts["memory"] = str(ctx.loadgen_memory_bytes)
    if amounts:
        # Requests equal to limits: Guaranteed QoS, neither throttled below nor evicted first.
        container["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
    if ctx.store_secret:
        # s3:// datasets are read with the store's credentials; optional, so a cluster without a
        # store still runs synthetic datasets.
        container["envFrom"] = [{"secretRef": {"name": ctx.store_secret, "optional": True}}]
    return _pod_spec(ctx, [container])


def loadgen_pod(ctx: ObjectContext, name: str, agent: str, env: dict[str, str]) -> JsonObject:
    """A LoadGen server: one long-lived agent whose sessions are reused across runs."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(ctx, name, Component.LOADGEN, experiment_of(agent), agent),
        "spec": _loadgen_spec(ctx, env),
    }


def loadgen_job(ctx: ObjectContext, name: str, agent: str, env: dict[str, str], active_deadline_s: int,
                ttl_after_finished_s: int) -> JsonObject:
    """A job-mode LoadGen: a fresh agent for one client of one repeat, deleted after it. The
    agent is a server and never exits by itself: activeDeadlineSeconds ends a Job whose
    controller died, and ttlSecondsAfterFinished then removes it."""
    experiment = experiment_of(agent)
    labels = _labels(ctx, name, Component.LOADGEN_JOB, experiment)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(ctx, name, Component.LOADGEN_JOB, experiment, agent),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": active_deadline_s,
            "ttlSecondsAfterFinished": ttl_after_finished_s,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {ANNOTATION_AGENT: agent, ANNOTATION_EXPIRES_AT: ctx.expires_at},
                },
                "spec": _loadgen_spec(ctx, env),
            },
        },
    }
