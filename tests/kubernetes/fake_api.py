"""A test double of the Kubernetes API: an in-memory `ClusterApi` for the backend's tests where
no cluster can run. It is not a Kubernetes; it behaves like one where the backend depends on it:

- Every create is validated like the API server does it: kubernetes-validate --strict for the
  oldest supported version plus the server's own rules (tests/kubernetes/checks.py); an invalid
  object is refused with 422, a duplicate name with 409, an unknown namespace with 404.
- Objects get a uid, a creationTimestamp and a resourceVersion from one cluster-wide counter; a
  watch replays changes after a resourceVersion in order (ADDED, MODIFIED, DELETED) and then
  follows new ones until its timeout; one from before `compact()` fails with 410 Gone.
- A scheduler binds pods to nodes by nodeSelector, taints and free requests (cpu, memory,
  nvidia.com/gpu), or marks them Unschedulable with the scheduler's message ("0/2 nodes are
  available: 1 Insufficient nvidia.com/gpu, ...") and a FailedScheduling event, and tries again
  when a pod goes away. A kubelet pulls images (unknown ones fail: ErrImagePull, then
  ImagePullBackOff, with the kubelet's events), starts containers, runs gRPC readiness probes
  (only images that serve gRPC health pass; others log "Readiness probe failed" events) and
  keeps the containers' output for the log API.
- A job controller makes each Job's pod from its template. A StatefulSet controller makes
  `<set>-<ordinal>` pods (Parallel: all at once) with the set's hostname, subdomain and
  `statefulset.kubernetes.io/pod-name` label, and replaces one that is deleted while its set
  lives. Where `crds` offers it, a LeaderWorkerSet controller makes its headless Service, its
  leader pod `<lws>-0` and, once the leader is Ready (startupPolicy LeaderReady; at once with
  LeaderCreated), the workers `<lws>-0-<i>`, injecting LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and
  LWS_WORKER_INDEX. Simplified: the real controller makes them through two StatefulSets (the
  leader's, owned by the LWS; the workers', owned by the leader pod); here the leader pod is owned
  by the LWS and the workers by the leader pod, which the garbage collector follows the same way.
  Discovery (`served_kinds`) lists a CRD's kind only when it is offered. `timeline` records in
  order when each object was created, each pod became Ready and each object was removed.
- Pods are deleted gracefully
  (deletionTimestamp first, DELETED later); the garbage collector deletes dependents of a
  deleted owner (or of an owner that never existed) and orphans them on propagation Orphan,
  which, as in batch/v1, is the default for Jobs.

Images behave as `images` says: IMAGE_SERVES (a MECBench image: `mecbench` answers the gRPC
health probe), IMAGE_HANGS (a MECBench image whose agent never answers it), IMAGE_CRASHES (a
MECBench image whose agent exits 1), IMAGE_RUNS (a plain image such as pause: it runs its own
entrypoint, has no `mecbench` to run as a command, answers no probe). Anything else does not exist.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.backends.kubernetes import ClusterApiError, Listing, WatchEvent
from tests.kubernetes.checks import OLDEST, all_problems

JsonObject = dict[str, Any]

IMAGE_SERVES = "serves"
IMAGE_HANGS = "hangs"
IMAGE_CRASHES = "crashes"
IMAGE_RUNS = "runs"
# Real-world misbehaviour (issue 20): a MECBench image whose first container creation times out
# on a busy node (CreateContainerError, then it starts); one whose creation never succeeds; an
# image whose process serves for a few steps and is then OOM-killed (a server sidecar dying).
IMAGE_CREATE_ERROR_ONCE = "create-error-once"
IMAGE_CREATE_ERROR = "create-error"
IMAGE_DIES = "dies"

_API_VERSIONS = {"Pod": "v1", "Service": "v1", "ConfigMap": "v1", "Event": "v1", "Namespace": "v1", "Node": "v1",
                 "Job": "batch/v1", "StatefulSet": "apps/v1", "NetworkPolicy": "networking.k8s.io/v1",
                 "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1"}
# Kinds that exist only where their CRD is installed (FakeCluster's `crds`).
_CRD_KINDS = {"LeaderWorkerSet"}
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
STS_POD_LABEL = "statefulset.kubernetes.io/pod-name"
_CLUSTER_SCOPED = {"Namespace", "Node"}
GPU = "nvidia.com/gpu"


@dataclass
class FakeNode:
    name: str
    cpu: float = 8.0
    memory: int = 32 * 2**30
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JsonObject] = field(default_factory=list)
    ip: str = ""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity(text: str) -> float:
    """A Kubernetes quantity as a number (cores for cpu, bytes for memory)."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
                "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    if not match:
        raise ValueError(f"not a quantity: {text}")
    return float(match.group(1)) * suffixes.get(match.group(2), 1.0)


def _get_path(obj: JsonObject, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _split_selector(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def label_matches(labels: dict[str, str], selector: str) -> bool:
    for term in _split_selector(selector):
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            values = {v.strip() for v in match.group(3).split(",")}
            inside = labels.get(match.group(1)) in values
            if inside != (match.group(2) == "in"):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_matches(obj: JsonObject, selector: str) -> bool:
    for term in _split_selector(selector):
        if "!=" in term:
            path, value = term.split("!=", 1)
            if _get_path(obj, path.strip()) == value.strip():
                return False
        else:
            path, value = term.replace("==", "=").split("=", 1)
            if _get_path(obj, path.strip()) != value.strip():
                return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeCluster:
    def __init__(
        self,
        nodes: list[FakeNode],
        images: dict[str, str],
        namespaces: tuple[str, ...] = ("default",),
        step_s: float = 0.01,
        version: str = OLDEST,
        crds: tuple[str, ...] = (),
    ) -> None:
        self.crds = set(crds)
        # (what, kind, name): "create", "ready" (a pod's Ready condition turned True), "remove".
        self.timeline: list[tuple[str, str, str]] = []
        for index, node in enumerate(nodes):
            node.ip = node.ip or f"172.18.0.{index + 2}"
        self.nodes = {node.name: node for node in nodes}
        self.images = dict(images)
        self.step_s = step_s
        self.version = version
        self._cond = threading.Condition(threading.RLock())
        self._store: dict[tuple[str, str, str], JsonObject] = {}
        self._history: list[tuple[int, str, str, str, JsonObject]] = []
        self._rv = 0
        self._compacted = 0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ips = itertools.count(2)
        self._logs: dict[tuple[str, str, str], bytearray] = {}
        self._closed = False
        self.requests: list[tuple[str, str, str]] = []  # (verb, kind, name), for assertions
        # How a real API server's watches and lists misbehave, switched on by the tests:
        # watches that send BOOKMARKs while idle (as with allowWatchBookmarks); the next
        # `cut_watches` watches break after their first event (a restart, a proxy's idle cut);
        # the next `expire_watches` answer 410 Gone; the next `unreachable_lists` lists fail as
        # an API server that is restarting does (status 0).
        self.bookmarks = False
        # A cluster autoscaler, off unless `scale_up_after_steps` > 0: for a pod no node fits, it
        # posts TriggeredScaleUp that many steps later when one of `spare_nodes` would fit it
        # (NotTriggerScaleUp otherwise), and the node joins `node_ready_after_steps` after that.
        self.spare_nodes: list[FakeNode] = []
        self.scale_up_after_steps = 0.0
        self.node_ready_after_steps = 10.0
        self._scale_seen: set[str] = set()
        self._create_errors: set[tuple[str, str]] = set()
        self.cut_watches = 0
        self.expire_watches = 0
        self.unreachable_lists = 0
        self.watches_cut = 0
        for namespace in namespaces:
            self.create("Namespace", "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        self._worker = threading.Thread(target=self._run_timers, name="fake-cluster", daemon=True)
        self._worker.start()

    # --- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    def _later(self, steps: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + steps * self.step_s, next(self._seq), fn))
            self._cond.notify_all()

    def _run_timers(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    if self._timers and self._timers[0][0] <= now:
                        _, _, fn = heapq.heappop(self._timers)
                        break
                    self._cond.wait(self._timers[0][0] - now if self._timers else None)
                else:
                    return
                fn()

    def _emit(self, kind: str, namespace: str, event_type: str, obj: JsonObject) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._history.append((self._rv, kind, namespace, event_type, copy.deepcopy(obj)))
        self._cond.notify_all()

    def compact(self) -> None:
        """Forget the history so far, as etcd compaction does: older watches get 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._history.clear()

    def _key(self, kind: str, namespace: str, name: str) -> tuple[str, str, str]:
        return (kind, "" if kind in _CLUSTER_SCOPED else namespace, name)

    # --- ClusterApi ----------------------------------------------------------------------------

    def create(self, kind: str, namespace: str, body: JsonObject) -> JsonObject:
        with self._cond:
            return copy.deepcopy(self._create(kind, namespace, copy.deepcopy(body), validate=True))

    def _create(self, kind: str, namespace: str, obj: JsonObject, validate: bool) -> JsonObject:
        self.requests.append(("create", kind, (obj.get("metadata") or {}).get("name", "")))
        if kind in _CRD_KINDS and kind not in self.crds:
            raise ClusterApiError(404, "NotFound", "the server could not find the requested resource")
        if kind == "Node" or kind not in _API_VERSIONS:
            raise ClusterApiError(405, "MethodNotAllowed", f"create of {kind} is not supported here")
        if obj.get("kind") != kind or obj.get("apiVersion") != _API_VERSIONS[kind]:
            raise ClusterApiError(400, "BadRequest", f"body is {obj.get('apiVersion')}/{obj.get('kind')}, not {kind}")
        meta = obj.setdefault("metadata", {})
        if kind not in _CLUSTER_SCOPED:
            if meta.setdefault("namespace", namespace) != namespace:
                raise ClusterApiError(400, "BadRequest", "the namespace of the provided object does not match")
            if self._key("Namespace", "", namespace) not in self._store:
                raise ClusterApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta.pop("generateName") + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789")
                                                             for _ in range(5))
        if validate:
            problems = all_problems(obj, (self.version,))
            if problems:
                raise ClusterApiError(422, "Invalid", f'{kind} "{meta.get("name")}" is invalid: ' + "; ".join(problems))
        key = self._key(kind, namespace, meta["name"])
        if key in self._store:
            raise ClusterApiError(409, "AlreadyExists", f'{kind.lower()}s "{meta["name"]}" already exists')
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if kind == "Pod":
            obj["status"] = {"phase": "Pending", "conditions": []}
        elif kind == "Service" and obj["spec"].get("clusterIP") != "None":  # a headless one has none
            obj["spec"]["clusterIP"] = f"10.96.0.{next(self._ips)}"
        elif kind == "Job":
            obj["status"] = {}
        self._store[key] = obj
        self.timeline.append(("create", kind, meta["name"]))
        self._emit(kind, namespace, "ADDED", obj)
        for ref in meta.get("ownerReferences") or []:
            if self._by_uid(ref.get("uid", "")) is None:
                # The garbage collector deletes a dependent whose owner does not exist.
                self._later(2, lambda k=key: self._collect(k))
        if kind == "Pod":
            self._later(1, lambda: self._schedule(namespace, meta["name"]))
        elif kind == "Job":
            self._later(1, lambda: self._job_pod(namespace, meta["name"]))
        elif kind == "StatefulSet":
            self._later(1, lambda: self._reconcile_set(namespace, meta["name"]))
        elif kind == "LeaderWorkerSet":
            self._later(1, lambda: self._reconcile_lws(namespace, meta["name"]))
        return obj

    def served_kinds(self, group_version: str) -> list[str]:
        with self._cond:
            self.requests.append(("discover", group_version, ""))
            kinds = [kind for kind, version in _API_VERSIONS.items()
                     if version == group_version and (kind not in _CRD_KINDS or kind in self.crds)]
            return kinds  # [] where nothing is served: the real client's answer to discovery's 404

    def get(self, kind: str, namespace: str, name: str) -> JsonObject:
        with self._cond:
            obj = self._store.get(self._key(kind, namespace, name))
            if obj is None:
                raise ClusterApiError(404, "NotFound", f'{kind.lower()}s "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, kind: str, namespace: str, label_selector: str = "", field_selector: str = "") -> Listing:
        with self._cond:
            if kind in _CRD_KINDS and kind not in self.crds:
                raise ClusterApiError(404, "NotFound", "the server could not find the requested resource")
            if self.unreachable_lists > 0 and kind == "Pod":
                self.unreachable_lists -= 1
                raise ClusterApiError(0, "Unreachable", "ProtocolError: ('Connection aborted.', "
                                                        "RemoteDisconnected('Remote end closed connection'))")
            items = [copy.deepcopy(obj) for obj in self._matching(kind, namespace, label_selector, field_selector)]
            return Listing(items, str(self._rv))

    def _matching(self, kind: str, namespace: str, label_selector: str, field_selector: str) -> list[JsonObject]:
        if kind == "Node":
            return [self._node_object(node) for node in self.nodes.values()
                    if label_matches(self._node_object(node)["metadata"]["labels"], label_selector)]
        return [
            obj for (k, ns, _), obj in sorted(self._store.items())
            if k == kind and (not namespace or ns == namespace)
            and label_matches(obj["metadata"].get("labels") or {}, label_selector)
            and field_matches(obj, field_selector)
        ]

    def patch(self, kind: str, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        with self._cond:
            key = self._key(kind, namespace, name)
            obj = self._store.get(key)
            if obj is None:
                raise ClusterApiError(404, "NotFound", f'{kind.lower()}s "{name}" not found')
            merged = merge_patch(obj, patch)
            merged["metadata"]["uid"] = obj["metadata"]["uid"]
            problems = all_problems({k: v for k, v in merged.items() if k != "status"}, (self.version,))
            if problems:
                raise ClusterApiError(422, "Invalid", "; ".join(problems))
            self._store[key] = merged
            self._emit(kind, namespace, "MODIFIED", merged)
            return copy.deepcopy(merged)

    def delete(self, kind: str, namespace: str, name: str, propagation: str = "") -> None:
        with self._cond:
            self.requests.append(("delete", kind, name))
            key = self._key(kind, namespace, name)
            obj = self._store.get(key)
            if obj is None:
                raise ClusterApiError(404, "NotFound", f'{kind.lower()}s "{name}" not found')
            # batch/v1 Jobs orphan their pods unless told otherwise: the API's own default.
            policy = propagation or ("Orphan" if kind == "Job" else "Background")
            if kind == "Pod":
                if obj["metadata"].get("deletionTimestamp"):
                    return
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = (obj.get("spec") or {}).get(
                    "terminationGracePeriodSeconds", 30)
                self._emit(kind, namespace, "MODIFIED", obj)
                self._later(3, lambda: self._remove(key, policy))
            else:
                self._remove(key, policy)

    def _remove(self, key: tuple[str, str, str], policy: str) -> None:
        obj = self._store.pop(key, None)
        if obj is None:
            return
        self.timeline.append(("remove", key[0], key[2]))
        self._emit(key[0], key[1], "DELETED", obj)
        uid = obj["metadata"]["uid"]
        for dep_key, dependent in list(self._store.items()):
            refs = dependent["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            if policy == "Orphan":
                dependent["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                self._emit(dep_key[0], dep_key[1], "MODIFIED", dependent)
            else:
                self._later(2, lambda k=dep_key: self._collect(k))
        if key[0] == "Pod":
            for (kind, ns, name), pod in list(self._store.items()):
                if kind == "Pod" and not pod["spec"].get("nodeName"):
                    self._later(1, lambda ns=ns, name=name: self._schedule(ns, name))
            # A set replaces a pod of its own that is gone while the set lives.
            for ref in obj["metadata"].get("ownerReferences") or []:
                owner = self._by_uid(ref.get("uid", ""))
                if owner is None or owner["metadata"].get("deletionTimestamp"):
                    continue
                if ref.get("kind") == "StatefulSet":
                    self._later(1, lambda n=ref["name"]: self._reconcile_set(key[1], n))
                elif ref.get("kind") == "Pod" and LWS_NAME_LABEL in obj["metadata"].get("labels", {}):
                    lws = obj["metadata"]["labels"][LWS_NAME_LABEL]
                    self._later(1, lambda n=lws: self._reconcile_lws(key[1], n))

    def _collect(self, key: tuple[str, str, str]) -> None:
        """The garbage collector: delete `key` if none of its owners exists any more."""
        obj = self._store.get(key)
        if obj is None:
            return
        refs = obj["metadata"].get("ownerReferences") or []
        if refs and all(self._by_uid(ref.get("uid", "")) is None for ref in refs):
            self.delete(key[0], key[1], key[2], "Background")

    def _by_uid(self, uid: str) -> JsonObject | None:
        return next((obj for obj in self._store.values() if obj["metadata"].get("uid") == uid), None)

    def watch(
        self,
        kind: str,
        namespace: str,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str = "",
        timeout_s: float = 60.0,
    ) -> Iterator[WatchEvent]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self.expire_watches > 0:
                self.expire_watches -= 1
                raise ClusterApiError(410, "Expired", f"too old resource version: {resource_version} ({self._rv})")
            cut = self.cut_watches > 0
            if cut:
                self.cut_watches -= 1
            if resource_version and int(resource_version) < self._compacted:
                raise ClusterApiError(410, "Expired", f"too old resource version: {resource_version} ({self._rv})")
            start = int(resource_version) if resource_version else self._rv
            initial = [] if resource_version else [copy.deepcopy(o) for o in
                                                   self._matching(kind, namespace, label_selector, field_selector)]
            index = next((i for i, entry in enumerate(self._history) if entry[0] > start), len(self._history))
        for obj in initial:
            yield WatchEvent("ADDED", obj)
        sent = 0
        while True:
            bookmark = ""
            with self._cond:
                while index >= len(self._history) and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    if self.bookmarks:
                        # Idle: the API server says how far the watch has got, and nothing else.
                        self._cond.wait(min(remaining, 2 * self.step_s))
                        if index >= len(self._history):
                            bookmark = str(self._rv)
                            break
                    else:
                        self._cond.wait(remaining)
                if self._closed:
                    return
                batch = self._history[index:]
                index = len(self._history)
            if bookmark:
                yield WatchEvent("BOOKMARK", {"kind": kind, "apiVersion": _API_VERSIONS.get(kind, "v1"),
                                              "metadata": {"resourceVersion": bookmark}})
            for _, k, ns, event_type, obj in batch:
                if k != kind or (namespace and ns != namespace):
                    continue
                if label_matches(obj["metadata"].get("labels") or {}, label_selector) and field_matches(
                    obj, field_selector
                ):
                    if cut and sent >= 1:
                        with self._cond:
                            self.watches_cut += 1
                        raise ClusterApiError(0, "StreamBroken", "watch stream broke: ProtocolError: "
                                                                 "('Response ended prematurely')")
                    sent += 1
                    yield WatchEvent(event_type, copy.deepcopy(obj))

    def read_log(
        self, namespace: str, pod: str, container: str = "", follow: bool = False, tail_lines: int = 0
    ) -> Iterator[bytes]:
        with self._cond:
            obj = self._store.get(self._key("Pod", namespace, pod))
            if obj is None:
                raise ClusterApiError(404, "NotFound", f'pods "{pod}" not found')
            names = [c["name"] for c in obj["spec"]["containers"]]
            if not container:
                if len(names) > 1:
                    raise ClusterApiError(400, "BadRequest", f"a container name must be specified for pod {pod}, "
                                                             f"choose one of: {names}")
                container = names[0]
            status = next((s for s in obj["status"].get("containerStatuses") or [] if s["name"] == container), None)
            waiting = (status or {}).get("state", {}).get("waiting")
            if status is None or waiting:
                reason = (waiting or {}).get("reason", "ContainerCreating")
                raise ClusterApiError(400, "BadRequest",
                                      f'container "{container}" in pod "{pod}" is waiting to start: {reason}')
            uid = obj["metadata"]["uid"]
            data = bytes(self._logs.get((namespace, pod, container), b""))
        if tail_lines:
            data = b"".join(data.splitlines(keepends=True)[-tail_lines:])
        if data:
            yield data
        if not follow:
            return
        sent = len(data) if not tail_lines else len(self._logs.get((namespace, pod, container), b""))
        while True:
            with self._cond:
                current = self._store.get(self._key("Pod", namespace, pod))
                buffer = self._logs.get((namespace, pod, container), bytearray())
                while len(buffer) <= sent and current is not None and current["metadata"]["uid"] == uid \
                        and not self._closed:
                    self._cond.wait(1.0)
                    current = self._store.get(self._key("Pod", namespace, pod))
                chunk = bytes(buffer[sent:])
                sent = len(buffer)
                gone = current is None or current["metadata"]["uid"] != uid or self._closed
            if chunk:
                yield chunk
            if gone:
                return

    # --- scheduler, kubelet, job controller ----------------------------------------------------

    def _node_object(self, node: FakeNode) -> JsonObject:
        allocatable = {"cpu": str(node.cpu), "memory": str(node.memory), "pods": "110"}
        if node.gpus:
            allocatable[GPU] = str(node.gpus)
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, **node.labels}},
            "spec": {"taints": node.taints} if node.taints else {},
            "status": {"allocatable": allocatable, "capacity": allocatable,
                       "addresses": [{"type": "InternalIP", "address": node.ip}]},
        }

    @staticmethod
    def _requests(pod: JsonObject) -> dict[str, float]:
        total: dict[str, float] = {}
        for container in pod["spec"]["containers"]:
            resources = container.get("resources") or {}
            amounts = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
            for name, value in amounts.items():
                total[name] = total.get(name, 0.0) + _quantity(value)
        return total

    def _fit(self, pod: JsonObject, node: FakeNode) -> list[str]:
        """Why `pod` does not fit on `node`, as the scheduler words it; [] when it fits."""
        spec = pod["spec"]
        labels = self._node_object(node)["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
            return ["node(s) didn't match Pod's node affinity/selector"]
        tolerations = spec.get("tolerations") or []
        for taint in node.taints:
            if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
                t.get("key") == taint.get("key") and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
                for t in tolerations
            ):
                return [f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"]
        # Required pod anti-affinity on the hostname (matchLabels terms): no matching pod on the node.
        anti = ((spec.get("affinity") or {}).get("podAntiAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution") or []
        for term in anti:
            wanted = (term.get("labelSelector") or {}).get("matchLabels") or {}
            if term.get("topologyKey") == "kubernetes.io/hostname" and any(
                kind == "Pod" and other is not pod and other["spec"].get("nodeName") == node.name
                and not other["metadata"].get("deletionTimestamp")
                and all(other["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
                for (kind, _, _), other in self._store.items()
            ):
                return ["node(s) didn't match pod anti-affinity rules"]
        used: dict[str, float] = {}
        for (kind, _, _), other in self._store.items():
            if kind == "Pod" and other is not pod and other["spec"].get("nodeName") == node.name \
                    and other["status"].get("phase") not in ("Succeeded", "Failed"):
                for name, value in self._requests(other).items():
                    used[name] = used.get(name, 0.0) + value
        capacity = {"cpu": node.cpu, "memory": float(node.memory), GPU: float(node.gpus)}
        return [
            f"Insufficient {name}" for name, value in self._requests(pod).items()
            if used.get(name, 0.0) + value > capacity.get(name, 0.0) + 1e-9
        ]

    def _schedule(self, namespace: str, name: str) -> None:
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Pending":
            return
        node_name = pod["spec"].get("nodeName")
        if not node_name:
            reasons: dict[str, int] = {}
            for node in self.nodes.values():
                problems = self._fit(pod, node)
                if not problems:
                    node_name = node.name
                    break
                for problem in problems:
                    reasons[problem] = reasons.get(problem, 0) + 1
            if not node_name:
                total = len(self.nodes)
                detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
                message = (f"0/{total} nodes are available: {detail}. preemption: 0/{total} nodes are available: "
                           f"{total} Preemption is not helpful for scheduling.")
                self._set_condition(pod, "PodScheduled", "False", "Unschedulable", message)
                self._emit("Pod", namespace, "MODIFIED", pod)
                self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
                if self.scale_up_after_steps > 0 and pod["metadata"]["uid"] not in self._scale_seen:
                    self._scale_seen.add(pod["metadata"]["uid"])
                    self._later(self.scale_up_after_steps, lambda: self._autoscale(namespace, name))
                return
            pod["spec"]["nodeName"] = node_name
            self._event(pod, "Normal", "Scheduled", f"Successfully assigned {namespace}/{name} to {node_name}",
                        "default-scheduler")
        self._set_condition(pod, "PodScheduled", "True")
        pod["status"]["hostIP"] = self.nodes[node_name].ip
        self._emit("Pod", namespace, "MODIFIED", pod)
        self._later(1, lambda: self._pull(namespace, name))

    def _autoscale(self, namespace: str, name: str) -> None:
        """The cluster autoscaler's answer to an unschedulable pod, some time after it."""
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["spec"].get("nodeName"):
            return
        fits = next((node for node in self.spare_nodes if not self._fit(pod, node)), None)
        if fits is None:
            self._event(pod, "Normal", "NotTriggerScaleUp",
                        "pod didn't trigger scale-up: 1 max node group size reached", "cluster-autoscaler")
            return
        self.spare_nodes.remove(fits)
        self._event(pod, "Normal", "TriggeredScaleUp",
                    f"pod triggered scale-up: [{{{fits.name}-pool 0->1 (max: 4)}}]", "cluster-autoscaler")

        def join() -> None:
            fits.ip = fits.ip or f"172.18.1.{len(self.nodes) + 2}"
            self.nodes[fits.name] = fits
            for (kind, ns, other), obj in list(self._store.items()):
                if kind == "Pod" and not obj["spec"].get("nodeName"):
                    self._later(1, lambda ns=ns, other=other: self._schedule(ns, other))

        self._later(self.node_ready_after_steps, join)

    def _pull(self, namespace: str, name: str) -> None:
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        missing = []
        statuses = []
        for container in pod["spec"]["containers"]:
            image = container["image"]
            state: JsonObject = {"waiting": {"reason": "ContainerCreating"}}
            if image not in self.images:
                message = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
                           f'failed to resolve reference "{image}": not found')
                state = {"waiting": {"reason": "ErrImagePull", "message": message}}
                missing.append(image)
                self._event(pod, "Normal", "Pulling", f'Pulling image "{image}"')
                self._event(pod, "Warning", "Failed", f'Failed to pull image "{image}": {message}')
                self._event(pod, "Warning", "Failed", "Error: ErrImagePull")
            statuses.append({"name": container["name"], "image": image, "ready": False, "restartCount": 0,
                             "started": False, "state": state})
        pod["status"]["containerStatuses"] = statuses
        self._emit("Pod", namespace, "MODIFIED", pod)
        if missing:
            self._later(2, lambda: self._back_off(namespace, name))
        else:
            self._later(1, lambda: self._start(namespace, name))

    def _back_off(self, namespace: str, name: str) -> None:
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        for status in pod["status"]["containerStatuses"]:
            if status["state"].get("waiting", {}).get("reason") == "ErrImagePull":
                image = status["image"]
                status["state"] = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}
                self._event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"')
                self._event(pod, "Warning", "Failed", "Error: ImagePullBackOff")
        self._emit("Pod", namespace, "MODIFIED", pod)

    def _start(self, namespace: str, name: str) -> None:
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        node = self.nodes[pod["spec"]["nodeName"]]
        ip = node.ip if pod["spec"].get("hostNetwork") else f"10.244.{list(self.nodes).index(node.name)}.{next(self._ips)}"
        pod["status"].update(phase="Running", podIP=ip, podIPs=[{"ip": ip}], startTime=_now())
        crashed = False
        retry = False
        for container, status in zip(pod["spec"]["containers"], pod["status"]["containerStatuses"], strict=True):
            behaviour = self.images[container["image"]]
            if "running" in status["state"] or "terminated" in status["state"]:
                continue  # started on an earlier try
            once = (pod["metadata"]["uid"], container["name"])
            if behaviour == IMAGE_CREATE_ERROR or (behaviour == IMAGE_CREATE_ERROR_ONCE
                                                   and once not in self._create_errors):
                # What the kubelet reports when the runtime times out creating the container on
                # a loaded node; it tries again.
                self._create_errors.add(once)
                retry = True
                message = "context deadline exceeded"
                status["state"] = {"waiting": {"reason": "CreateContainerError", "message": message}}
                self._event(pod, "Warning", "Failed", f"Error: {message}", "kubelet")
                continue
            self._event(pod, "Normal", "Created", f"Created container {container['name']}", "kubelet")
            if behaviour == IMAGE_RUNS and container.get("command"):
                # What containerd says when the command is not in the image.
                crashed = True
                message = (f'failed to create containerd task: failed to create shim task: OCI runtime create '
                           f'failed: exec: "{container["command"][0]}": executable file not found in $PATH')
                status["state"] = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                                  "startedAt": _now(), "finishedAt": _now()}}
                self._event(pod, "Warning", "Failed", f"Error: {message}", "kubelet")
                continue
            if behaviour == IMAGE_CRASHES:
                crashed = True
                self._append_log(namespace, name, container["name"], b"mecbench: error: the agent could not start\n")
                status["state"] = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": _now(),
                                                  "finishedAt": _now()}}
                continue
            self._event(pod, "Normal", "Started", f"Started container {container['name']}", "kubelet")
            status.update(started=True, state={"running": {"startedAt": _now()}})
            if behaviour == IMAGE_DIES:
                self._later(5, lambda c=container["name"]: self._oom_kill(namespace, name, c))
            if behaviour in (IMAGE_SERVES, IMAGE_CREATE_ERROR_ONCE):
                self._append_log(namespace, name, container["name"],
                                 b'{"event": "server_listening", "address": "0.0.0.0:50051", "level": "info"}\n')
        if crashed:
            if pod["spec"].get("restartPolicy", "Always") == "Never":
                # Failed only once every container has ended; while one lives the pod Runs.
                if all("terminated" in st["state"] for st in pod["status"]["containerStatuses"]):
                    pod["status"]["phase"] = "Failed"
            else:
                for status in pod["status"]["containerStatuses"]:
                    if "terminated" in status["state"]:
                        status["state"] = {"waiting": {"reason": "CrashLoopBackOff",
                                                       "message": "back-off 10s restarting failed container"}}
                self._event(pod, "Warning", "BackOff", "Back-off restarting failed container")
        for condition in ("Initialized", "ContainersReady", "Ready"):
            self._set_condition(pod, condition, "True" if condition == "Initialized" else "False",
                                "" if condition == "Initialized" else "ContainersNotReady")
        self._emit("Pod", namespace, "MODIFIED", pod)
        if retry:
            self._later(5, lambda: self._start(namespace, name))
        elif not crashed:
            self._later(1, lambda: self._probe(namespace, name))

    def _oom_kill(self, namespace: str, name: str, container: str) -> None:
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        killed = {"exitCode": 137, "reason": "OOMKilled", "startedAt": _now(), "finishedAt": _now()}
        restarts = pod["spec"].get("restartPolicy", "Always") != "Never"
        for status in pod["status"]["containerStatuses"]:
            if status["name"] == container and restarts:
                # The kubelet starts it again: the pod Runs on, with a restart counted.
                status.update(ready=False, restartCount=status.get("restartCount", 0) + 1,
                              lastState={"terminated": killed}, state={"running": {"startedAt": _now()}})
                self._event(pod, "Warning", "BackOff", "Back-off restarting failed container", "kubelet")
            elif status["name"] == container:
                status.update(ready=False, state={"terminated": killed})
        if all("terminated" in st["state"] for st in pod["status"]["containerStatuses"]):
            pod["status"]["phase"] = "Failed"
        for condition in ("ContainersReady", "Ready"):
            self._set_condition(pod, condition, "False", "ContainersNotReady")
        self._emit("Pod", namespace, "MODIFIED", pod)

    def kill_container(self, namespace: str, pod: str, container: str) -> None:
        """The kernel's OOM killer ends a container's process now (a test's fault)."""
        with self._cond:
            self._oom_kill(namespace, pod, container)

    def _reconcile_set(self, namespace: str, name: str) -> None:
        """The StatefulSet controller: every `<set>-<ordinal>` pod exists (Parallel)."""
        sts = self._store.get(("StatefulSet", namespace, name))
        if sts is None or sts["metadata"].get("deletionTimestamp"):
            return
        spec = sts["spec"]
        template = spec["template"]
        for ordinal in range(int(spec.get("replicas", 1))):
            pod_name = f"{name}-{ordinal}"
            if ("Pod", namespace, pod_name) in self._store:
                continue
            labels = {**(template.get("metadata") or {}).get("labels", {}), STS_POD_LABEL: pod_name,
                      "apps.kubernetes.io/pod-index": str(ordinal), "controller-revision-hash": f"{name}-5d9c7b8f6d"}
            pod_spec = {**copy.deepcopy(template["spec"]), "hostname": pod_name}
            if spec.get("serviceName"):
                pod_spec["subdomain"] = spec["serviceName"]
            self._controlled_pod(namespace, pod_name, labels, template, pod_spec, sts, "statefulset-controller")

    def _controlled_pod(self, namespace: str, name: str, labels: dict[str, str], template: JsonObject,
                        spec: JsonObject, owner: JsonObject, component: str) -> None:
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": namespace, "labels": labels,
                "annotations": dict((template.get("metadata") or {}).get("annotations", {})),
                "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                     "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": spec,
        }
        try:
            self._create("Pod", namespace, pod, validate=True)
        except ClusterApiError as exc:
            self._event(owner, "Warning", "FailedCreate", f"create Pod {name} failed: {exc.message}", component)
            return
        self._event(owner, "Normal", "SuccessfulCreate", f"create Pod {name} successful", component)

    def _reconcile_lws(self, namespace: str, name: str) -> None:
        """The LeaderWorkerSet controller (replicas 1): its headless Service, the leader, and the
        workers once the startup policy lets them be made."""
        lws = self._store.get(("LeaderWorkerSet", namespace, name))
        if lws is None or lws["metadata"].get("deletionTimestamp"):
            return
        spec = lws["spec"]
        group = spec["leaderWorkerTemplate"]
        size = int(group.get("size", 1))
        owner_ref = [{"apiVersion": lws["apiVersion"], "kind": "LeaderWorkerSet", "name": name,
                      "uid": lws["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        if ("Service", namespace, name) not in self._store:
            self._create("Service", namespace, {
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "ownerReferences": owner_ref},
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                         "selector": {LWS_NAME_LABEL: name}},
            }, validate=True)
        leader_name = f"{name}-0"
        address = f"{leader_name}.{name}.{namespace}"

        def member_spec(template: JsonObject, hostname: str, index: int) -> JsonObject:
            pod_spec = {**copy.deepcopy(template["spec"]), "hostname": hostname, "subdomain": name}
            for container in pod_spec["containers"]:
                container["env"] = [*container.get("env", []), {"name": "LWS_LEADER_ADDRESS", "value": address},
                                    {"name": "LWS_GROUP_SIZE", "value": str(size)},
                                    {"name": "LWS_WORKER_INDEX", "value": str(index)}]
            return pod_spec

        leader_template = group.get("leaderTemplate") or group["workerTemplate"]
        leader = self._store.get(("Pod", namespace, leader_name))
        if leader is None:
            labels = {**(leader_template.get("metadata") or {}).get("labels", {}), LWS_NAME_LABEL: name,
                      LWS_WORKER_INDEX_LABEL: "0", STS_POD_LABEL: leader_name}
            self._controlled_pod(namespace, leader_name, labels, leader_template,
                                 member_spec(leader_template, leader_name, 0), lws, "lws-controller")
            return
        leader_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in leader["status"].get("conditions", []))
        if spec.get("startupPolicy", "LeaderCreated") == "LeaderReady" and not leader_ready:
            return
        worker_template = group["workerTemplate"]
        for index in range(1, size):
            pod_name = f"{leader_name}-{index}"
            if ("Pod", namespace, pod_name) in self._store:
                continue
            labels = {**(worker_template.get("metadata") or {}).get("labels", {}), LWS_NAME_LABEL: name,
                      LWS_WORKER_INDEX_LABEL: str(index), STS_POD_LABEL: pod_name}
            self._controlled_pod(namespace, pod_name, labels, worker_template,
                                 member_spec(worker_template, pod_name, index), leader, "lws-controller")

    def _probe(self, namespace: str, name: str) -> None:
        pod = self._store.get(("Pod", namespace, name))
        if pod is None or pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running":
            return
        failing = []
        for container, status in zip(pod["spec"]["containers"], pod["status"]["containerStatuses"], strict=True):
            probe = container.get("readinessProbe")
            serves = self.images[container["image"]] in (IMAGE_SERVES, IMAGE_CREATE_ERROR_ONCE)
            alive = "running" in status["state"]
            # gRPC health, or (agents with TLS: the kubelet's gRPC probe is plaintext) a port that
            # accepts connections: both only where the agent serves.
            ready = alive and (probe is None or (("grpc" in probe or "tcpSocket" in probe) and serves))
            status["ready"] = ready
            if not ready:
                port = (probe or {}).get("grpc", (probe or {}).get("tcpSocket", {})).get("port", "")
                failing.append(container["name"])
                self._event(pod, "Warning", "Unhealthy",
                            f'Readiness probe failed: timeout: failed to connect service ":{port}" within 1s: '
                            "context deadline exceeded", "kubelet")
        state = "False" if failing else "True"
        for condition in ("ContainersReady", "Ready"):
            self._set_condition(pod, condition, state, "ContainersNotReady" if failing else "")
        self._emit("Pod", namespace, "MODIFIED", pod)
        if not failing:
            self.timeline.append(("ready", "Pod", name))
            lws = pod["metadata"].get("labels", {}).get(LWS_NAME_LABEL)
            if lws and pod["metadata"]["labels"].get(LWS_WORKER_INDEX_LABEL) == "0":
                self._later(1, lambda: self._reconcile_lws(namespace, lws))
        if failing:
            self._later(20, lambda: self._probe(namespace, name))

    def _job_pod(self, namespace: str, job_name: str) -> None:
        job = self._store.get(("Job", namespace, job_name))
        if job is None:
            return
        template = job["spec"]["template"]
        uid = job["metadata"]["uid"]
        labels = {**(template.get("metadata") or {}).get("labels", {}), "batch.kubernetes.io/controller-uid": uid,
                  "batch.kubernetes.io/job-name": job_name, "controller-uid": uid, "job-name": job_name}
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": f"{job_name}-", "namespace": namespace, "labels": labels,
                "annotations": dict((template.get("metadata") or {}).get("annotations", {})),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": copy.deepcopy(template["spec"]),
        }
        try:
            created = self._create("Pod", namespace, pod, validate=True)
        except ClusterApiError as exc:
            self._event(job, "Warning", "FailedCreate", f"Error creating: {exc.message}", "job-controller")
            return
        self._event(job, "Normal", "SuccessfulCreate", f"Created pod: {created['metadata']['name']}", "job-controller")
        job["status"].update(active=1, startTime=_now())
        self._emit("Job", namespace, "MODIFIED", job)

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _set_condition(pod: JsonObject, kind: str, status: str, reason: str = "", message: str = "") -> None:
        conditions = [c for c in pod["status"].get("conditions") or [] if c["type"] != kind]
        condition = {"type": kind, "status": status, "lastTransitionTime": _now()}
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        pod["status"]["conditions"] = [*conditions, condition]

    def _append_log(self, namespace: str, pod: str, container: str, data: bytes) -> None:
        self._logs.setdefault((namespace, pod, container), bytearray()).extend(data)
        self._cond.notify_all()

    def write_log(self, namespace: str, pod: str, container: str, data: bytes) -> None:
        """What a container prints later (for the log-following tests)."""
        with self._cond:
            self._append_log(namespace, pod, container, data)

    def _event(self, obj: JsonObject, event_type: str, reason: str, message: str, component: str = "kubelet") -> None:
        """Record an Event as the kubelet and controllers do: one per reason and message, its
        count going up when it repeats."""
        meta = obj["metadata"]
        namespace = meta.get("namespace", "default")
        for (kind, ns, _), event in self._store.items():
            if kind == "Event" and ns == namespace and event["involvedObject"]["uid"] == meta["uid"] \
                    and event["reason"] == reason and event["message"] == message:
                event["count"] += 1
                event["lastTimestamp"] = _now()
                self._emit("Event", namespace, "MODIFIED", event)
                return
        stamp = _now()
        event = {
            "apiVersion": "v1", "kind": "Event",
            # Named as the API server's event recorder does: after the time, so names sort by it.
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": namespace, "uid": meta["uid"]},
            "reason": reason, "message": message, "type": event_type, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "source": {"component": component},
        }
        self._create("Event", namespace, event, validate=False)

    def objects(self, kind: str, namespace: str = "") -> list[JsonObject]:
        with self._cond:
            return [copy.deepcopy(obj) for obj in self._matching(kind, namespace, "", "")]
