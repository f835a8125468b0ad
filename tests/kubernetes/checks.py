"""Checks of Kubernetes objects: kubernetes-validate's strict JSON-schema validation (unknown
fields and wrong types refused) for each Kubernetes version in VERSIONS, plus the API server's
own rules that a schema cannot express (name formats, label syntax, port names, the
allowPrivilegeEscalation/CAP_SYS_ADMIN rule), so that what passes here the API server accepts."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate.utils as kv

# The oldest version the deploy/ manifests and the backend's objects target, and the newest the
# installed kubernetes-validate knows.
OLDEST = "1.33"
VERSIONS = (OLDEST, kv.latest_version())

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_PORT_NAME = re.compile(r"^(?=.{1,15}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


# LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) is a CRD: kubernetes-validate has no schema for it.
# Its own fields are checked strictly against this schema, written from the LWS API types
# (api/leaderworkerset/v1/leaderworkerset_types.go: names, enums, minimums), and each of its pod
# templates with kubernetes-validate --strict as the PodTemplateSpec it is (a v1 PodTemplate).
_TEMPLATE = {"type": "object"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["leaderWorkerTemplate"],
            "properties": {
                "replicas": _INT32,
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {"type": "object"},
                "networkConfig": {
                    "type": "object", "additionalProperties": False, "required": ["subdomainPolicy"],
                    "properties": {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
                },
                "leaderWorkerTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["workerTemplate"],
                    "properties": {
                        "leaderTemplate": _TEMPLATE,
                        "workerTemplate": _TEMPLATE,
                        "size": {**_INT32, "minimum": 1},
                        "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart",
                                                   "None"]},
                        "subGroupPolicy": {"type": "object"},
                    },
                },
            },
        },
    },
}


def _lws_problems(obj: dict[str, Any], versions: tuple[str, ...]) -> list[str]:
    import jsonschema

    problems = [f"LeaderWorkerSet: {'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
                for error in jsonschema.Draft202012Validator(LWS_SCHEMA).iter_errors(obj)]
    templates = ((obj.get("spec") or {}).get("leaderWorkerTemplate") or {})
    for key in ("leaderTemplate", "workerTemplate"):
        if key in templates:
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                       "template": templates[key]}
            problems += [f"{key}: {problem}" for problem in schema_problems(wrapped, versions)]
    return problems


def schema_problems(obj: dict[str, Any], versions: tuple[str, ...] = VERSIONS) -> list[str]:
    if obj.get("kind") == "LeaderWorkerSet":
        return _lws_problems(obj, versions)
    problems = []
    for version in versions:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "(root)"
            problems.append(f"{version}: {where}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            problems.append(f"{version}: {exc.message}")
    return problems


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (not prefix or (len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.match(prefix)))) and bool(_LABEL_NAME.match(name))


def _check_labels(where: str, labels: dict[str, str] | None, problems: list[str]) -> None:
    for key, value in (labels or {}).items():
        if not _label_key_ok(key):
            problems.append(f"{where}: label key {key!r} is invalid")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            problems.append(f"{where}: label value {value!r} ({key}) is invalid")


def _check_pod_spec(where: str, spec: dict[str, Any], problems: list[str], claims: set[str] | None = None) -> None:
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    names = [c.get("name", "") for c in containers]
    if len(set(names)) != len(names):
        problems.append(f"{where}: container names repeat: {names}")
    # A StatefulSet's volumeClaimTemplates are volumes of its pods too.
    volumes = {v.get("name") for v in spec.get("volumes") or []} | (claims or set())
    for container in containers:
        cwhere = f"{where}.containers[{container.get('name')}]"
        if not _DNS_LABEL.match(container.get("name", "")):
            problems.append(f"{cwhere}: name is not a DNS label")
        port_names = [p.get("name") for p in container.get("ports") or [] if p.get("name")]
        for port in container.get("ports") or []:
            if port.get("name") and not _PORT_NAME.match(port["name"]):
                problems.append(f"{cwhere}: port name {port['name']!r} is not an IANA service name (<= 15)")
            if spec.get("hostNetwork") and "hostPort" in port and port["hostPort"] != port["containerPort"]:
                problems.append(f"{cwhere}: with hostNetwork, hostPort must equal containerPort")
        if len(set(port_names)) != len(port_names):
            problems.append(f"{cwhere}: port names repeat")
        env_names = [e.get("name", "") for e in container.get("env") or []]
        if len(set(env_names)) != len(env_names):
            problems.append(f"{cwhere}: env names repeat")
        for name in env_names:
            if not _ENV_NAME.match(name):
                problems.append(f"{cwhere}: env name {name!r} is invalid")
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                problems.append(f"{cwhere}: volumeMount {mount.get('name')} names no volume")
        context = container.get("securityContext") or {}
        added = [c.removeprefix("CAP_") for c in (context.get("capabilities") or {}).get("add") or []]
        if context.get("allowPrivilegeEscalation") is False and (context.get("privileged") or "SYS_ADMIN" in added):
            problems.append(f"{cwhere}: allowPrivilegeEscalation false with privileged or CAP_SYS_ADMIN is refused")
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(probe_name) or {}
            port = (probe.get("grpc") or {}).get("port")
            if port is not None and not isinstance(port, int):
                problems.append(f"{cwhere}: {probe_name}.grpc.port must be a number")
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        problems.append(f"{where}: restartPolicy {spec.get('restartPolicy')!r}")


def api_problems(obj: dict[str, Any]) -> list[str]:
    """The API server's validation beyond the schema, for the kinds MECBench makes or ships."""
    problems: list[str] = []
    kind = obj.get("kind", "")
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    where = f"{kind}/{name}"
    name_rule = _DNS_1035 if kind in ("Service", "Namespace") else _DNS_SUBDOMAIN
    if kind in ("Pod", "Job", "Service", "ConfigMap", "DaemonSet", "Deployment", "StatefulSet", "Secret",
                "ServiceAccount", "Namespace", "PersistentVolumeClaim", "NetworkPolicy", "LeaderWorkerSet"):
        if not name_rule.match(name):
            problems.append(f"{where}: name is not a valid {kind} name")
        if kind == "Job" and len(name) > 63:
            problems.append(f"{where}: a Job's name goes into its pods' job-name label: at most 63")
    _check_labels(where, meta.get("labels"), problems)
    for ref in meta.get("ownerReferences") or []:
        if not ref.get("uid"):
            problems.append(f"{where}: ownerReference without uid")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        _check_pod_spec(where, spec, problems)
    elif kind == "LeaderWorkerSet":
        if len(name) > 49:
            problems.append(f"{where}: its worker StatefulSet's revision label (`<name>-0-<10>`) must fit 63")
        templates = spec.get("leaderWorkerTemplate") or {}
        for key in ("leaderTemplate", "workerTemplate"):
            template = templates.get(key) or {}
            _check_labels(f"{where}.{key}", (template.get("metadata") or {}).get("labels"), problems)
            _check_pod_spec(f"{where}.{key}", template.get("spec") or {}, problems)
            if key in templates and (template.get("spec") or {}).get("restartPolicy", "Always") != "Always":
                problems.append(f"{where}.{key}: its pods are a StatefulSet's: restartPolicy Always")
    elif kind in ("Job", "DaemonSet", "Deployment", "StatefulSet"):
        template = spec.get("template") or {}
        if kind != "Job" and (template.get("spec") or {}).get("restartPolicy", "Always") != "Always":
            problems.append(f"{where}: a {kind}'s pods restart Always")
        if kind == "StatefulSet" and len(name) > 52:
            problems.append(f"{where}: its pods' controller-revision-hash label (`<name>-<10>`) must fit 63")
        _check_labels(f"{where}.template", (template.get("metadata") or {}).get("labels"), problems)
        claims = {(c.get("metadata") or {}).get("name", "") for c in spec.get("volumeClaimTemplates") or []}
        _check_pod_spec(f"{where}.template", template.get("spec") or {}, problems, claims)
        if kind == "Job" and (template.get("spec") or {}).get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(f"{where}: a Job's pods restart Never or OnFailure")
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if kind != "Job" and any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{where}: selector does not match the template's labels")
    elif kind == "NetworkPolicy":
        for rule in spec.get("ingress") or []:
            for port in rule.get("ports") or []:
                if "endPort" in port and (not isinstance(port.get("port"), int) or port["endPort"] < port["port"]):
                    problems.append(f"{where}: endPort needs a numeric port at most endPort")
    elif kind == "Service":
        ports = spec.get("ports") or []
        if len(ports) > 1 and any(not p.get("name") for p in ports):
            problems.append(f"{where}: every port of a multi-port Service needs a name")
        for port in ports:
            if port.get("name") and not _DNS_LABEL.match(port["name"]):
                problems.append(f"{where}: port name {port['name']!r} is not a DNS label")
    return problems


def all_problems(obj: dict[str, Any], versions: tuple[str, ...] = VERSIONS) -> list[str]:
    return schema_problems(obj, versions) + api_problems(obj)
